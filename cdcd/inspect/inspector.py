"""The inspector: row-driven and keyspace-driven passes, then the re-check that rules out changes in flight.

How a verdict is reached is described in :mod:`cdcd.inspect`; the parts it drives are
:class:`~cdcd.inspect.rows.RowReader` (Postgres), :class:`~cdcd.inspect.entries.EntryReader`
(Redis) and :class:`~cdcd.inspect.classify.Classifier` (one entry against its rows).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from cdcd.fillguard import Entry
from cdcd.inspect.classify import Classifier
from cdcd.inspect.entries import FOREIGN, EntryReader
from cdcd.inspect.keymatch import match_key
from cdcd.inspect.model import Check, DbRow, Table
from cdcd.inspect.report import InspectError, InspectReport, TableStats
from cdcd.inspect.rows import RowReader
from cdcd.ratelimit import TokenBucket

if TYPE_CHECKING:  # imported where used: ``cdcd --help`` must not pay for psycopg, redis and pydantic
    from cdcd.config import Config
    from cdcd.keys import Template
    from cdcd.rules import Rules


class Inspector:
    def __init__(self, config: Config, rate: float, settle_timeout: float, heartbeat: bool = True,
                 clock_margin: float = 0.05, page_size: int = 500) -> None:

        from cdcd.sources.settings import PostgresSourceSettings

        if not isinstance(config.source, PostgresSourceSettings):
            # Rows come from Postgres, and a candidate settles once the daemon's version (an LSN in the
            # slot's commit order) passes a WAL position: neither holds for a Kafka/Debezium source.
            raise InspectError(f"inspect needs the postgres source (it reads the rows and compares the slot's "
                               f"commit LSNs); this configuration's source is {config.source.type!r}")
        self.config = config
        self.rules: Rules = config.rules()
        self.ks = self.rules.keyspace
        self.bucket = TokenBucket(rate)
        self.settle_timeout = settle_timeout
        self.heartbeat = heartbeat
        self.report = InspectReport()
        self.classifier = Classifier(clock_margin=clock_margin)
        page = page_size if rate <= 0 else max(1, min(page_size, int(rate) or 1))
        self.entries = EntryReader(config.redis.client(), self.ks)  # redis.Redis, or RedisCluster (every master)
        self.rows = RowReader(config.source.conninfo(), self.bucket, page)
        self.tables: dict[str, Table] = {}

    def close(self) -> None:
        self.rows.close()
        self.entries.redis.close()

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        self.report.commit_timestamps = self.classifier.commit_timestamps = self.rows.check_commit_timestamps()
        if not self.report.commit_timestamps:
            self.report.notes.append(
                "track_commit_timestamp is off: values written by applications (invalidate rules) cannot be "
                "dated and are counted as unverifiable; turn it on (needs a restart) to check them")
        self._measure_clocks()
        self.tables, errors, notes = self.rows.tables(self.rules)
        self.report.notes.extend(notes)
        if errors:
            raise InspectError("rules do not match the database schema:\n  " + "\n  ".join(errors))

    def _measure_clocks(self) -> None:
        """Offset between the Redis and Postgres clocks (best of three), so times compare across servers."""
        best: tuple[float, float] | None = None
        for _ in range(3):
            t0 = time.time()
            pg_clock = self.rows.now()
            t1 = time.time()
            sec, usec = self.entries.redis.time()
            t2 = time.time()
            pg_now = pg_clock if pg_clock is not None else t0
            pg_off = pg_now - (t0 + t1) / 2
            redis_off = (sec + usec / 1e6) - (t1 + t2) / 2
            err = (t1 - t0) / 2 + (t2 - t1) / 2
            if best is None or err < best[1]:
                best = (redis_off - pg_off, err)
        assert best is not None
        self.classifier.offset, self.classifier.offset_err = best
        self.report.clock_offset = best[0]

    def _reload(self, c: Check) -> bool:
        rows: dict[str, DbRow] = {}
        ok = False
        bare = c.key[len(self.ks.prefix):]
        for template, values in c.lookups:
            found = self.rows.lookup(c.table, template, values, bare)
            if found is None:
                continue
            ok = True
            for r in found:
                rows[r.ctid] = r
        c.rows = list(rows.values())
        return ok

    def _heartbeat(self) -> None:
        error = self.rows.emit_heartbeat()
        if error is None:
            self.report.heartbeats += 1
            return
        self.report.notes.append(f"heartbeat failed ({error}): on an idle database candidates may stay unsettled")
        self.heartbeat = False

    # -------------------------------------------------------------- passes

    def _checks_for_rows(self, t: Table, rows: list[DbRow], lsn: int, seen: set[str]) -> list[Check]:
        by_key: dict[str, Check] = {}
        for r in rows:
            for tpl in t.rule.keys:
                k = tpl.render(r.values)
                if k is None:
                    continue
                full = self.ks.entry(k)
                lookup = (tpl, {col: r.raw[col] or "" for col in tpl.columns})
                c = by_key.get(full)
                if c is None:
                    c = by_key[full] = Check(full, t, [lookup], [r], lsn=lsn)
                else:
                    if all(x[0] is not tpl or x[1] != lookup[1] for x in c.lookups):
                        c.lookups.append(lookup)
                    if all(x.ctid != r.ctid for x in c.rows):
                        c.rows.append(r)
        seen.update(by_key)
        return list(by_key.values())

    def _evaluate(self, checks: list[Check]) -> list[Check]:
        """Read entries, classify, tally; return the candidates (stale on first sight)."""
        found = self.entries.entries([c.key for c in checks])
        entries = [e for e in found if isinstance(e, Entry)]
        self.entries.clear_tags()
        tags = self.entries.tag_counters(entries)
        candidates = []
        for c, e in zip(checks, found, strict=True):
            if e == FOREIGN:
                self.report.foreign_keys += 1
                continue
            c.entry = e if isinstance(e, Entry) else None
            self.classifier.classify(c, tags)
            stats = self.report.tables.setdefault(c.table.relation, TableStats())
            stats.keys += 1
            self.report.keys_checked += 1
            if c.origin == "scan":
                self.report.orphan_keys_checked += 1
            if c.verdict == "stale":
                candidates.append(c)
            else:
                self._tally(c)
        return candidates

    def _tally(self, c: Check) -> None:
        stats = self.report.tables.setdefault(c.table.relation, TableStats())
        if c.verdict in ("fresh", "stale", "unverifiable"):
            stats.cached += 1
            self.report.cached += 1
        if c.verdict == "fresh":
            stats.fresh += 1
            self.report.fresh += 1
        elif c.verdict == "unverifiable":
            stats.unverifiable += 1
            self.report.unverifiable += 1
        elif c.verdict == "stale":
            stats.stale += 1
        else:
            stats.not_cached += 1
            self.report.not_cached[c.verdict] = self.report.not_cached.get(c.verdict, 0) + 1

    def _settle(self, pending: list[Check]) -> None:
        """Re-check candidates after the daemon passed the WAL position read after their rows."""
        deadline = time.monotonic() + self.settle_timeout
        while pending:
            target = max(c.lsn for c in pending)
            if not self._wait_applied(target, deadline):
                break
            previous = {id(c): c.fingerprint() for c in pending}
            lost: list[Check] = []
            for c in pending:
                if not self._reload(c):
                    lost.append(c)  # its rows cannot be looked up again: never call it stale
            for c in lost:
                pending.remove(c)
                self.report.unsettled.append(c.key)
                self._tally_unsettled(c)
            if not pending:
                break
            lsn = self.rows.lsn()
            found = self.entries.entries([c.key for c in pending])
            self.entries.clear_tags()
            tags = self.entries.tag_counters([e for e in found if isinstance(e, Entry)])
            still: list[Check] = []
            applied = self.entries.applied()
            for c, e in zip(pending, found, strict=True):
                c.entry = e if isinstance(e, Entry) else None
                c.lsn = lsn
                self.classifier.classify(c, tags)
                if c.verdict != "stale":
                    self.report.in_flight += 1
                    self._tally(c)
                elif c.fingerprint() == previous[id(c)]:
                    self.report.stale.append(self.classifier.stale_entry(c, applied))
                    self._tally(c)
                else:
                    still.append(c)  # the row or the entry moved: wait for the daemon once more
            pending = still
            if time.monotonic() >= deadline:
                break
        for c in pending:
            self.report.unsettled.append(c.key)
            self._tally_unsettled(c)

    def _tally_unsettled(self, c: Check) -> None:
        stats = self.report.tables.setdefault(c.table.relation, TableStats())
        stats.cached += 1
        self.report.cached += 1

    def _wait_applied(self, target: int, deadline: float) -> bool:
        start = time.monotonic()
        beat = False
        while True:
            applied = self.entries.applied()
            if applied is not None and applied >= target:
                self.report.applied_version = applied
                return True
            now = time.monotonic()
            if now >= deadline:
                self.report.applied_version = applied
                return False
            if self.heartbeat and not beat and now - start >= 0.2:
                self._heartbeat()  # an idle database: give the daemon a position past the target
                beat = True
            time.sleep(0.02)

    def _match(self, key: str) -> list[tuple[Table, Template, dict[str, str]]]:
        return match_key(self.tables.values(), key[len(self.ks.prefix):])

    def run(self, sample: int | None, all_rows: bool) -> InspectReport:
        t0 = time.monotonic()
        self.setup()
        seen: set[str] = set()
        candidates: list[Check] = []
        n = sample if sample is not None else 1000
        for t in self.tables.values():
            stats = self.report.tables.setdefault(t.relation, TableStats())
            pages: Iterable[list[DbRow]] = self.rows.pages(t) if all_rows else [self.rows.sample(t, n)]
            for rows in pages:
                lsn = self.rows.lsn()  # after the rows: every change they show committed before this position
                if not all_rows:
                    self.bucket.take(len(rows))
                stats.rows += len(rows)
                self.report.rows_checked += len(rows)
                checks = self._checks_for_rows(t, rows, lsn, seen)
                for start in range(0, len(checks), 500):
                    candidates.extend(self._evaluate(checks[start:start + 500]))
        # The other way round: keys whose row is gone (deleted rows, changed key columns).
        batch: list[Check] = []
        for key in self.entries.scan_keys(None if all_rows else n):
            if key in seen:
                continue
            self.bucket.take(1)
            matches = self._match(key)
            if not matches:
                self.report.unmapped_keys += 1
                continue
            by_table: dict[str, Check] = {}
            for t, tpl, values in matches:
                c = by_table.setdefault(t.relation, Check(key, t, [], origin="scan"))
                c.lookups.append((tpl, values))
            # a key several tables' templates produce is checked against the table that has rows for it
            batch.extend(by_table.values())
            if len(batch) >= 200:
                candidates.extend(self._evaluate_scanned(batch))
                batch = []
        if batch:
            candidates.extend(self._evaluate_scanned(batch))
        self._settle(candidates)
        if self.report.applied_version is None:
            self.report.applied_version = self.entries.applied()
        self.report.elapsed = time.monotonic() - t0
        return self.report

    def _evaluate_scanned(self, checks: list[Check]) -> list[Check]:
        """Keyspace-scan keys: only those holding something need their rows looked up."""
        found = self.entries.entries([c.key for c in checks])
        holding: list[Check] = []
        by_key: dict[str, list[Check]] = {}
        for c, e in zip(checks, found, strict=True):
            if isinstance(e, Entry) and e.hit:
                by_key.setdefault(c.key, []).append(c)
        for group in by_key.values():
            for c in group:
                if not self._reload(c):
                    c.lookups = []
            usable = [c for c in group if c.lookups]
            with_rows = [c for c in usable if c.rows]
            pick = (with_rows or usable)[:1]
            holding.extend(pick)
            if not usable:
                self.report.unmapped_keys += 1
        lsn = self.rows.lsn()
        for c in holding:
            c.lsn = lsn
        return self._evaluate(holding) if holding else []


def run_inspect(config: Config, sample: int | None, all_rows: bool, rate: float, threshold: float,
                settle_timeout: float, out: TextIO | None, *, json_output: bool = False, heartbeat: bool = True,
                clock_margin: float = 0.05) -> InspectReport:
    """Inspect, print the report to ``out`` (text or JSON), return it; ``report.exit_code`` is the verdict."""
    inspector = Inspector(config, rate=rate, settle_timeout=settle_timeout, heartbeat=heartbeat,
                          clock_margin=clock_margin)
    try:
        report = inspector.run(sample, all_rows)
    finally:
        inspector.close()
    report.threshold = threshold
    if out is not None:
        if json_output:
            out.write(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            report.render(out)
    return report
