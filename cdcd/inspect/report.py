"""What ``cdcd inspect`` found: per-table counts, the stale entries, the verdict (exit code), text and JSON.

Kept apart from the inspector so the report's shape (what operators and scripts read) is
defined in one place and can be built or rendered without a database.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

EXIT_OK = 0
EXIT_STALE = 1
EXIT_CONFIG = 2
EXIT_INCONCLUSIVE = 3


class InspectError(Exception):
    """The inspector cannot run with this configuration (exit code 2)."""


@dataclass(slots=True)
class StaleEntry:
    key: str
    relation: str
    reason: str
    writer: str  # who wrote the entry: cdc | app | ?
    entry_version: int
    applied_version: int | None
    written_at: str | None  # Redis clock of the entry's last write (from its generation)
    row_changed_at: str | None  # commit time of the row's last change (track_commit_timestamp)
    stale_seconds: float | None  # how long before the row's last change the entry was written
    lsn_gap_max: int | None  # applied version - entry version: an upper bound on how far behind, in WAL bytes


@dataclass(slots=True)
class TableStats:
    rows: int = 0
    keys: int = 0
    cached: int = 0
    fresh: int = 0
    stale: int = 0
    unverifiable: int = 0
    not_cached: int = 0


@dataclass
class InspectReport:
    rows_checked: int = 0
    keys_checked: int = 0
    cached: int = 0
    fresh: int = 0
    unverifiable: int = 0
    not_cached: dict[str, int] = field(default_factory=dict)
    orphan_keys_checked: int = 0
    unmapped_keys: int = 0
    foreign_keys: int = 0
    in_flight: int = 0  # candidates that resolved once the daemon caught up
    stale: list[StaleEntry] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    tables: dict[str, TableStats] = field(default_factory=dict)
    threshold: float = 0.0
    applied_version: int | None = None
    commit_timestamps: bool = False
    clock_offset: float = 0.0  # Redis clock - Postgres clock, seconds
    heartbeats: int = 0
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def stale_ratio(self) -> float:
        return len(self.stale) / self.keys_checked if self.keys_checked else 0.0

    @property
    def consistency_ratio(self) -> float:
        return 1.0 - self.stale_ratio

    @property
    def exit_code(self) -> int:
        if self.stale and self.stale_ratio > self.threshold:
            return EXIT_STALE
        if self.unsettled:
            return EXIT_INCONCLUSIVE
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_checked": self.rows_checked, "keys_checked": self.keys_checked, "cached": self.cached,
            "fresh": self.fresh, "stale": len(self.stale), "unverifiable": self.unverifiable,
            "not_cached": self.not_cached, "orphan_keys_checked": self.orphan_keys_checked,
            "unmapped_keys": self.unmapped_keys, "foreign_keys": self.foreign_keys, "in_flight": self.in_flight,
            "unsettled": len(self.unsettled), "stale_ratio": self.stale_ratio,
            "consistency_ratio": self.consistency_ratio, "threshold": self.threshold,
            "applied_version": self.applied_version, "commit_timestamps": self.commit_timestamps,
            "clock_offset": round(self.clock_offset, 6), "heartbeats": self.heartbeats,
            "elapsed": round(self.elapsed, 3), "exit_code": self.exit_code,
            "tables": {rel: asdict(s) for rel, s in self.tables.items()},
            "stale_entries": [asdict(s) for s in self.stale],
            "unsettled_keys": self.unsettled, "notes": self.notes,
        }

    def render(self, out: TextIO) -> None:
        w = out.write
        w(f"{'table':<32} {'rows':>8} {'keys':>8} {'cached':>8} {'fresh':>8} {'stale':>6} {'unverif':>8} "
          f"{'not cached':>10}\n")
        for rel, ts in sorted(self.tables.items()):
            w(f"{rel:<32} {ts.rows:>8} {ts.keys:>8} {ts.cached:>8} {ts.fresh:>8} {ts.stale:>6} "
              f"{ts.unverifiable:>8} {ts.not_cached:>10}\n")
        nc = ", ".join(f"{k} {v}" for k, v in sorted(self.not_cached.items())) or "none"
        w(f"\nrows checked {self.rows_checked}, keys checked {self.keys_checked} "
          f"(of which {self.orphan_keys_checked} from the keyspace scan), cached {self.cached}, "
          f"fresh {self.fresh}, stale {len(self.stale)}, unverifiable {self.unverifiable}, "
          f"unsettled {len(self.unsettled)}\n")
        w(f"not cached: {nc}; in flight (resolved on re-check): {self.in_flight}; "
          f"keys matching no template: {self.unmapped_keys}\n")
        w(f"consistency ratio {self.consistency_ratio:.6f} (stale ratio {self.stale_ratio:.6f}, threshold "
          f"{self.threshold}); daemon applied version {self.applied_version}; commit timestamps "
          f"{'on' if self.commit_timestamps else 'off'}; {self.elapsed:.1f}s\n")
        for s in self.stale[:50]:
            how = []
            if s.stale_seconds is not None:
                how.append(f"{s.stale_seconds:.3f}s before the row's last change")
            if s.lsn_gap_max is not None:
                how.append(f"version {s.entry_version}, <= {s.lsn_gap_max} WAL bytes behind the daemon")
            w(f"STALE {s.key} ({s.relation}, written by {s.writer}): {s.reason}"
              f"{'; ' + '; '.join(how) if how else ''}\n")
        if len(self.stale) > 50:
            w(f"... and {len(self.stale) - 50} more stale entries (use --json for all)\n")
        for k in self.unsettled[:20]:
            w(f"UNSETTLED {k}: could not be re-checked after the daemon caught up (daemon down or lagging?)\n")
        for n in self.notes:
            w(f"note: {n}\n")
        verdict = {EXIT_OK: "OK", EXIT_STALE: "STALE ENTRIES ABOVE THRESHOLD",
                   EXIT_INCONCLUSIVE: "INCONCLUSIVE (unsettled candidates)"}[self.exit_code]
        w(f"result: {verdict}\n")

