"""What one cache entry means against its rows: fresh, stale, unverifiable, or not cached at all.

The rules (see :mod:`cdcd.inspect`): an entry holding nothing, or whose recorded tag counters
moved, is never served and so never stale; a daemon-written ``update`` value must equal the
row's projection; an application value is dated against the row's commit time; a cached "not
found" for a key a row maps to is stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdcd.inspect.model import Check, DbRow, generation, iso
from cdcd.inspect.report import StaleEntry

if TYPE_CHECKING:
    from cdcd.rules import CompiledRule


def projection(rule: CompiledRule, row: DbRow) -> bytes:
    from cdcd.rules import encode_projection  # pydantic: only once an inspection runs, not for ``cdcd --help``

    vals = row.values
    proj = vals if rule.columns is None else {k: vals.get(k) for k in rule.columns}
    return encode_projection(proj)


def equal(have: bytes, want: bytes) -> bool:
    if have == want:
        return True
    try:
        return bool(json.loads(have) == json.loads(want))
    except ValueError:
        return False


@dataclass
class Classifier:
    commit_timestamps: bool = False
    offset: float = 0.0  # Redis clock - Postgres clock, seconds
    offset_err: float = 0.0
    clock_margin: float = 0.05

    def classify(self, c: Check, tags: dict[str, str | None]) -> None:
        """Set ``c.verdict`` (and ``c.detail``) from ``c.entry``, ``c.rows`` and the current tag counters."""
        e = c.entry
        if e is None:
            c.verdict, c.detail = "absent", ""
            return
        if not e.hit:
            c.verdict = "lease" if e.writer == "lease" else "tombstone"
            return
        if e.tags:
            snap = e.tags
            if isinstance(snap, dict) and any(tags.get(k) != str(v) for k, v in snap.items()):
                c.verdict = "tag_invalid"  # readers check tags: this entry is never served
                return
        rule = c.table.rule
        if e.negative:
            if c.rows:
                c.verdict, c.detail = "stale", "cached as not found, but the row exists"
            else:
                c.verdict = "fresh"
            return
        assert e.value is not None
        if rule.action == "update":
            if any(equal(e.value, projection(rule, r)) for r in c.rows):
                c.verdict = "fresh"
                return
            if e.writer == "cdc":
                c.verdict = "stale"
                c.detail = ("value differs from the row's current projection" if c.rows
                            else "holds a value but no row maps to this key any more")
                return
        if not c.rows:
            c.verdict, c.detail = "unverifiable", "application value for a key no row maps to"
            return
        g = generation(e)
        if not self.commit_timestamps or g is None:
            c.verdict, c.detail = "unverifiable", "application value; commit times unknown"
            return
        written = g / 1e6
        changed = [r.committed + self.offset for r in c.rows if r.committed is not None]
        if changed and written < max(changed) - self.clock_margin - self.offset_err:
            c.verdict, c.detail = "stale", "written before the row's last change, which the daemon has applied"
            return
        c.verdict = "fresh" if changed else "unverifiable"
        if not changed:
            c.detail = "commit time of the row's last change unknown (frozen or too old)"

    def stale_entry(self, c: Check, applied: int | None) -> StaleEntry:
        e = c.entry
        assert e is not None
        g = generation(e)
        v = int(e.version)
        written = g / 1e6 if g is not None else None
        changed = [r.committed + self.offset for r in c.rows if r.committed is not None]
        row_at = max(changed) if changed else None
        return StaleEntry(
            key=c.key, relation=c.table.relation, reason=c.detail, writer=e.writer or "?", entry_version=v,
            applied_version=applied, written_at=iso(written), row_changed_at=iso(row_at),
            stale_seconds=round(row_at - written, 6) if row_at is not None and written is not None
            and row_at > written else None,
            lsn_gap_max=applied - v if applied is not None and v and applied >= v else None)
