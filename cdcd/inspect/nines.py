"""Consistency in nines: counting sampled cache reads against time bounds, with no I/O.

A *read* is one sample of a served cache entry (a value or a cached "not found") compared with
its rows. It is *consistent within a bound B* when it equals the database, or when the change it
misses committed less than B before the read (a change still in flight). The share of reads
consistent within B is expressed in nines, ``-log10(1 - share)``: 0.999 is three nines.

When no read was inconsistent the share is 1 and the nines infinite; what the sample can show is
then ``>= log10(reads)`` (one inconsistent read in the next ``reads`` would give exactly that), so
the value is capped there and marked as a lower bound. A stale read whose staleness is unknown (no
commit time for the row's change) counts as inconsistent at every bound: the measure errs towards
fewer nines, never more.

Kept pure (no database, Redis or clock) so the arithmetic is unit-tested on its own; the sampling
loop (:mod:`cdcd.inspect.watch`) feeds it and the metrics (:mod:`cdcd.inspect.watchmetrics`) and
the final table read it.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: Staleness histogram bucket upper edges, seconds (the last bucket is open-ended).
HISTOGRAM_EDGES = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_BOUNDS = (0.01, 0.1, 1.0)


@dataclass(frozen=True, slots=True)
class Nines:
    """Nines at one bound: ``value`` is exact unless ``capped`` (no inconsistent read: a lower bound)."""

    bound: float
    reads: int
    consistent: int
    value: float | None  # None: no reads yet
    capped: bool

    @property
    def share(self) -> float | None:
        return self.consistent / self.reads if self.reads else None

    def text(self) -> str:
        if self.value is None:
            return "n/a"
        return f">= {self.value:.2f}" if self.capped else f"{self.value:.2f}"

    def below(self, minimum: float | None) -> bool:
        """Does this fall short of ``minimum`` nines (None: of "no inconsistent read at all")?"""
        if self.value is None:
            return False
        if minimum is None:
            return not self.capped
        return not self.capped and self.value + 1e-9 < minimum  # 99 of 100 is 2 nines, not 1.999…


def nines(consistent: int, reads: int) -> tuple[float | None, bool]:
    """(nines, capped) for ``consistent`` of ``reads``; (None, False) without reads."""
    if reads <= 0:
        return None, False
    if consistent >= reads:
        return math.log10(reads), True
    return -math.log10(1.0 - consistent / reads), False


@dataclass(slots=True)
class StaleRead:
    key: str
    staleness: float | None  # seconds from the commit of the change the entry misses to the read; None: unknown
    reason: str
    settled: str  # "in_flight" (resolved once the daemon caught up), "lost" (still stale after), "behind"


@dataclass
class NinesCounter:
    """Running counts of one watch: reads by outcome, staleness per bound and as a histogram."""

    bounds: tuple[float, ...] = DEFAULT_BOUNDS
    consistent: int = 0
    stale: int = 0
    misses: int = 0  # sampled keys that serve nothing (absent, tombstone, lease, moved tags): not reads
    unverifiable: int = 0
    unsettled: int = 0  # candidates that neither settled nor had a known staleness: not counted as reads
    unknown_staleness: int = 0
    max_staleness: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(HISTOGRAM_EDGES) + 1))
    within: dict[float, int] = field(default_factory=dict)  # stale reads with staleness <= bound
    recent: deque[StaleRead] = field(default_factory=lambda: deque(maxlen=20))

    def __post_init__(self) -> None:
        if not self.bounds or any(b < 0 or math.isnan(b) for b in self.bounds):
            raise ValueError(f"bounds must be non-negative seconds, got {self.bounds!r}")
        self.bounds = tuple(sorted(set(self.bounds)))
        for b in self.bounds:
            self.within.setdefault(b, 0)

    @property
    def reads(self) -> int:
        return self.consistent + self.stale

    def record_consistent(self, n: int = 1) -> None:
        self.consistent += n

    def record_miss(self, n: int = 1) -> None:
        self.misses += n

    def record_unverifiable(self, n: int = 1) -> None:
        self.unverifiable += n

    def record_unsettled(self, n: int = 1) -> None:
        self.unsettled += n

    def record_stale(self, read: StaleRead) -> None:
        """One read that did not equal the database; consistent within every bound >= its staleness."""
        self.stale += 1
        self.recent.append(read)
        s = read.staleness
        if s is None or math.isnan(s):
            self.unknown_staleness += 1
            self.histogram[-1] += 1
            return
        s = max(0.0, s)
        self.max_staleness = max(self.max_staleness, s)
        self.histogram[bisect.bisect_left(HISTOGRAM_EDGES, s)] += 1
        for b in self.bounds:
            if s <= b:
                self.within[b] += 1

    def stale_beyond(self, bound: float) -> int:
        """Stale reads whose staleness exceeds ``bound`` (or is unknown)."""
        return self.stale - self._within(bound)

    def _within(self, bound: float) -> int:
        if bound in self.within:
            return self.within[bound]
        raise KeyError(f"{bound} is not one of the bounds {self.bounds}")

    def at(self, bound: float) -> Nines:
        ok = self.consistent + self._within(bound)
        value, capped = nines(ok, self.reads)
        return Nines(bound, self.reads, ok, value, capped)

    def all(self) -> list[Nines]:
        return [self.at(b) for b in self.bounds]

    def to_dict(self) -> dict[str, Any]:
        edges = [*(str(e) for e in HISTOGRAM_EDGES), "+Inf"]
        return {
            "reads": self.reads, "consistent": self.consistent, "stale": self.stale, "misses": self.misses,
            "unverifiable": self.unverifiable, "unsettled": self.unsettled,
            "unknown_staleness": self.unknown_staleness, "max_staleness": round(self.max_staleness, 6),
            "staleness_histogram": dict(zip(edges, self.histogram, strict=True)),
            "bounds": [{"bound": n.bound, "consistent": n.consistent, "share": n.share, "nines": n.value,
                        "capped": n.capped, "stale_beyond": self.stale_beyond(n.bound)} for n in self.all()],
            "recent_stale": [{"key": r.key, "staleness": r.staleness, "reason": r.reason, "settled": r.settled}
                             for r in self.recent],
        }


def format_bound(b: float) -> str:
    """``0.01`` -> ``10ms``, ``1.0`` -> ``1s``: how bounds are shown in tables and metric labels."""
    if b < 1 and b * 1000 == int(b * 1000):
        return f"{int(b * 1000)}ms"
    return f"{b:g}s"


def render(counter: NinesCounter, elapsed: float) -> str:
    """The final table: one line per bound, then the counts and the staleness histogram."""
    lines = [f"{'bound':>8} {'reads':>9} {'consistent':>11} {'stale beyond':>13} {'share':>12} {'nines':>9}"]
    for n in counter.all():
        share = f"{n.share:.6f}" if n.share is not None else "n/a"
        lines.append(f"{format_bound(n.bound):>8} {n.reads:>9} {n.consistent:>11} "
                     f"{counter.stale_beyond(n.bound):>13} {share:>12} {n.text():>9}")
    lines.append(f"\n{counter.reads} reads in {elapsed:.1f}s: {counter.consistent} equal to the database, "
                 f"{counter.stale} stale ({counter.unknown_staleness} of unknown staleness), max staleness "
                 f"{counter.max_staleness:.3f}s; not reads: {counter.misses} misses, {counter.unverifiable} "
                 f"unverifiable, {counter.unsettled} unsettled")
    if counter.stale:
        labels = [f"<={format_bound(e)}" for e in HISTOGRAM_EDGES] + [f">{format_bound(HISTOGRAM_EDGES[-1])}"]
        hist = ", ".join(f"{lab} {c}" for lab, c in zip(labels, counter.histogram, strict=True) if c)
        lines.append(f"staleness of stale reads: {hist}")
        for r in counter.recent:
            s = f"{r.staleness:.3f}s" if r.staleness is not None else "unknown"
            lines.append(f"STALE READ {r.key}: stale for {s} ({r.settled}): {r.reason}")
    return "\n".join(lines) + "\n"
