"""What ``cdcd inspect --watch`` found: the counts, how the run went, the verdict (exit code), text and JSON.

Apart from the loop (:mod:`cdcd.inspect.watch`) so the report's shape, what operators and CI read,
is defined in one place, as :mod:`cdcd.inspect.report` is for the one-shot inspector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TextIO

from cdcd.inspect.nines import NinesCounter, format_bound, render
from cdcd.inspect.report import EXIT_INCONCLUSIVE, EXIT_OK, EXIT_STALE


@dataclass
class WatchReport:
    counter: NinesCounter
    check_bound: float
    min_nines: float | None  # None: any read stale beyond check_bound fails
    elapsed: float = 0.0
    rounds: int = 0
    errors: int = 0
    ahead: int = 0  # consistent reads of entries newer than the rows' snapshot (included in consistent)
    followed: int = 0  # entries that differed when read and were followed
    commit_timestamps: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.counter.reads == 0:
            return EXIT_INCONCLUSIVE
        if self.counter.at(self.check_bound).below(self.min_nines):
            return EXIT_STALE
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {**self.counter.to_dict(), "check_bound": self.check_bound, "min_nines": self.min_nines,
                "elapsed": round(self.elapsed, 3), "rounds": self.rounds, "errors": self.errors,
                "ahead": self.ahead, "followed": self.followed,
                "commit_timestamps": self.commit_timestamps, "notes": self.notes, "exit_code": self.exit_code}

    def write(self, out: TextIO, json_output: bool = False) -> None:
        """The final report: the table (or JSON with ``json_output``)."""
        if json_output:
            out.write(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            self.render(out)

    def render(self, out: TextIO) -> None:
        out.write(render(self.counter, self.elapsed))
        out.write(f"{self.rounds} rounds; {self.followed} differing entries followed; {self.ahead} reads were "
                  f"ahead of the rows' snapshot (consistent); {self.errors} failed rounds\n")
        for n in self.notes:
            out.write(f"note: {n}\n")
        want = f"{self.min_nines} nines" if self.min_nines is not None else "no stale read"
        verdict = {EXIT_OK: "OK", EXIT_STALE: "BELOW THE REQUIRED NINES", EXIT_INCONCLUSIVE: "INCONCLUSIVE (no reads)"}
        out.write(f"result: {verdict[self.exit_code]} ({self.counter.at(self.check_bound).text()} nines within "
                  f"{format_bound(self.check_bound)}; required: {want})\n")
