"""``cdcd inspect --watch``: sample cache reads continuously and count how many were consistent within bounds.

Each round samples a few rows of one table (the tables in turn), paced by the same
:class:`~cdcd.ratelimit.TokenBucket` as ``inspect``, reads their keys from Redis and classifies
each entry exactly as ``inspect`` does (:class:`~cdcd.inspect.classify.Classifier`). A served
entry that equals the database is a consistent read. One that differs is followed until it
settles, as ``inspect`` follows candidates: once the daemon's applied version has passed the WAL
position read after the rows, the row and the entry are read again. Either the entry caught up (it
was a change *in flight*), or nothing moved and it is still stale (a *lost* invalidation), or the
daemon did not catch up within ``--settle-timeout`` (*behind*: daemon down or lagging). All three
were stale when read; what decides whether the read counts against a bound is its *staleness*:
the Redis clock at the read minus the commit time of the row's last change
(``pg_xact_commit_timestamp``, clocks aligned as ``inspect`` aligns them). An entry the daemon
wrote from a commit that may postdate the rows' snapshot (its version at or past the WAL position
read *before* the rows: a commit during the query is invisible to it but below the position read
after) is ahead of the sample, not behind it, and is consistent; so is any entry that equals the
rows as re-read while it is followed.

Counting and nines are :mod:`cdcd.inspect.nines` (pure); metrics are
:mod:`cdcd.inspect.watchmetrics`; the database and Redis sides are the inspector's own readers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from cdcd.fillguard import Entry
from cdcd.inspect.entries import FOREIGN
from cdcd.inspect.inspector import Inspector
from cdcd.inspect.model import Check, DbRow
from cdcd.inspect.nines import NinesCounter, StaleRead, format_bound
from cdcd.inspect.report import InspectError
from cdcd.inspect.watchreport import WatchReport

if TYPE_CHECKING:
    from cdcd.config import Config
    from cdcd.inspect.watchmetrics import WatchMetrics

_NOT_SERVED = ("absent", "tombstone", "lease", "tag_invalid")


@dataclass(slots=True)
class Candidate:
    """A served entry that differed from its rows when read, and what is known of that read."""

    check: Check
    read_at: float  # Redis clock, seconds
    staleness: float | None  # read_at - commit time of the rows' newest change; None without commit times
    entry: Entry  # as read
    tags: dict[str, str | None]  # tag counters as read


def _fingerprint(rows: list[DbRow]) -> frozenset[tuple[str, str]]:
    return frozenset((r.ctid, r.xmin) for r in rows)


class Watcher:
    def __init__(self, config: Config, *, bounds: tuple[float, ...], rate: float, batch: int,
                 settle_timeout: float, check_bound: float, min_nines: float | None, heartbeat: bool = True,
                 clock_margin: float = 0.05, metrics: WatchMetrics | None = None) -> None:
        if batch < 1:
            raise InspectError(f"--batch must be at least 1, got {batch}")
        counter = NinesCounter(tuple(bounds))
        if check_bound not in counter.bounds:
            raise InspectError(f"--nines-bound {check_bound} is not one of --bounds {counter.bounds}")
        self.inspector = Inspector(config, rate=rate, settle_timeout=settle_timeout, heartbeat=heartbeat,
                                   clock_margin=clock_margin, page_size=batch)
        self.batch = batch
        self.report = WatchReport(counter, check_bound, min_nines)
        self.metrics = metrics
        self._turn = 0
        self._new_staleness: list[float] = []

    def close(self) -> None:
        self.inspector.close()

    def setup(self) -> None:
        self.inspector.setup()
        self.report.commit_timestamps = self.inspector.report.commit_timestamps
        if not self.report.commit_timestamps:
            self.report.notes.append("track_commit_timestamp is off: the staleness of a stale read is unknown, so "
                                     "every stale read counts against every bound (fewer nines than the truth)")
        if not self.inspector.tables:
            raise InspectError("no table of the rules exists in the database: nothing to sample")

    # -------------------------------------------------------------- one round

    def round(self) -> None:
        """Sample one table's rows, read their keys' entries, read the rows again, judge each read."""
        ins = self.inspector
        tables = list(ins.tables.values())
        t = tables[self._turn % len(tables)]
        self._turn += 1
        before = ins.rows.lsn()  # every change committed before it is in the sample's snapshot
        rows = ins.rows.sample(t, self.batch)
        ins.bucket.take(max(1, len(rows)))
        checks = ins._checks_for_rows(t, rows, 0, set())
        if not checks:
            return
        sec, usec = ins.entries.redis.time()
        read_at = sec + usec / 1e6  # just before the entries are read: staleness is never overstated
        found = ins.entries.entries([c.key for c in checks])
        ins.entries.clear_tags()
        tags = ins.entries.tag_counters([e for e in found if isinstance(e, Entry)])
        # The rows again, after the read: together with the sample they bracket the database as it was
        # when the entries were read.
        after = ins.rows.reread(t, rows)
        lsn = ins.rows.lsn()  # after the rows: every change they show committed before it
        pending: list[Candidate] = []
        for c, e in zip(checks, found, strict=True):
            if e == FOREIGN:
                continue
            c.entry = e if isinstance(e, Entry) else None
            c.lsn = lsn
            sampled = c.rows
            if after is None:  # no primary key: look the key's rows up again
                ins._reload(c)
                now = c.rows
            else:
                bare = c.key[len(ins.ks.prefix):]
                now = [r for r in after if any(tpl.render(r.values) == bare for tpl, _ in c.lookups)]
            cand = self._judge(c, sampled, now, read_at, before, tags)
            if cand is not None:
                pending.append(cand)
        if pending:
            self.report.followed += len(pending)
            self._follow(pending)

    def _judge(self, c: Check, sampled: list[DbRow], now: list[DbRow], read_at: float, before: int,
               tags: dict[str, str | None]) -> Candidate | None:
        """Count one read; a candidate to follow when the entry differed from the database it was read against.

        The database at the read is ``now`` when the rows did not change between the two reads, or
        when their newest change committed before the read. Otherwise it lies between the two: an
        entry equal to either is consistent, as is a daemon value from a commit the sample could not
        see (version at or past ``before``); anything else is judged against the sample.
        """
        counter = self.report.counter
        ins = self.inspector
        c.rows = now
        ins.classifier.classify(c, tags)
        if c.verdict in _NOT_SERVED:
            counter.record_miss()
            return None
        if c.verdict == "fresh":
            counter.record_consistent()
            return None
        settled = _fingerprint(sampled) == _fingerprint(now)
        newest = self._newest_commit(now)
        if not settled and (newest is None or newest > read_at):
            c.rows = sampled
            ins.classifier.classify(c, tags)
            if c.verdict == "fresh":
                counter.record_consistent()  # the state just before the change that came with the read
                return None
            e = c.entry
            if e is not None and e.writer == "cdc" and int(e.version) >= before:
                counter.record_consistent()  # from a commit the sample could not see: ahead of it
                self.report.ahead += 1
                return None
        if c.verdict == "unverifiable":
            counter.record_unverifiable()
            return None
        if c.entry is None or c.verdict != "stale":
            counter.record_miss()
            return None
        commit = self._newest_commit(c.rows)
        staleness = max(0.0, read_at - commit) if commit is not None else None
        c.rows = now
        return Candidate(c, read_at, staleness, c.entry, dict(tags))

    def _newest_commit(self, rows: list[DbRow]) -> float | None:
        """Commit time of the newest of these rows' changes, on the Redis clock."""
        changed = [r.committed for r in rows if r.committed is not None]
        return max(changed) + self.inspector.classifier.offset if changed else None

    def _stale(self, cand: Candidate, settled: str) -> None:
        self.report.counter.record_stale(StaleRead(cand.check.key, cand.staleness, cand.check.detail, settled))
        if cand.staleness is not None:
            self._new_staleness.append(cand.staleness)

    def _follow(self, pending: list[Candidate]) -> None:
        """Re-read each candidate once the daemon has passed its position, until it settles or time runs out."""
        ins = self.inspector
        deadline = time.monotonic() + ins.settle_timeout
        while pending:
            if not ins._wait_applied(max(p.check.lsn for p in pending), deadline):
                break
            previous = {id(p): p.check.fingerprint() for p in pending}
            still: list[Candidate] = []
            for p in pending:
                detail = p.check.detail
                if not ins._reload(p.check):  # its rows cannot be looked up again: judge on what was read
                    p.check.detail = detail
                    self._judge_unsettled(p)
                else:
                    still.append(p)
            pending = [p for p in still if not self._ahead(p)]
            if not pending:
                break
            lsn = ins.rows.lsn()
            found = ins.entries.entries([p.check.key for p in pending])
            ins.entries.clear_tags()
            tags = ins.entries.tag_counters([e for e in found if isinstance(e, Entry)])
            still = []
            for p, e in zip(pending, found, strict=True):
                c = p.check
                detail = c.detail
                c.entry = e if isinstance(e, Entry) else None
                c.lsn = lsn
                ins.classifier.classify(c, tags)
                if c.verdict != "stale":
                    c.detail = detail
                    self._stale(p, "in_flight")  # stale when read, caught up since
                elif c.fingerprint() == previous[id(p)]:
                    self._stale(p, "lost")  # nothing moved and the daemon is past the change: lost
                else:
                    still.append(p)  # the row or the entry moved: once more
            pending = still
            if time.monotonic() >= deadline:
                break
        for p in pending:
            self._judge_unsettled(p)

    def _ahead(self, p: Candidate) -> bool:
        """Was the entry, as read, already the rows' *newer* state (a change that committed while they were read)?

        A commit becomes visible a moment after its record is in the WAL, so a snapshot can miss a
        change whose commit LSN is below the position read after it; the daemon may already have
        applied that change. Judged against the rows as re-read, such an entry is fresh: the read
        was consistent, and is counted so.
        """
        c = p.check
        probe = Check(c.key, c.table, c.lookups, c.rows, p.entry)
        self.inspector.classifier.classify(probe, p.tags)
        if probe.verdict == "stale":
            return False
        self.report.counter.record_consistent()
        self.report.ahead += 1
        return True

    def _judge_unsettled(self, p: Candidate) -> None:
        """Not settled in time: stale all the same when its staleness is known (the daemon is behind)."""
        if p.staleness is not None:
            self._stale(p, "behind")
        else:
            self.report.counter.record_unsettled()

    # -------------------------------------------------------------- the loop

    def run(self, duration: float | None, stop: threading.Event, log_interval: float = 10.0) -> WatchReport:
        import psycopg
        import redis
        import structlog

        log = structlog.get_logger("cdcd.inspect.watch")
        t0 = time.monotonic()
        self.setup()
        next_log = t0 + log_interval
        end = t0 + duration if duration is not None else None
        while not stop.is_set() and (end is None or time.monotonic() < end):
            try:
                self.round()
                self.report.rounds += 1
            except (psycopg.Error, redis.RedisError) as exc:
                # A database or Redis blip must not end a watch meant to run for days: count, log, retry.
                self.report.errors += 1
                log.warning("watch_round_failed", error=str(exc).strip()[:300], errors=self.report.errors)
                if self.metrics is not None:
                    self.metrics.errors.inc()
                stop.wait(1.0)
                self._reconnect_rows()
            self._publish()
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + log_interval
                self._log(log)
                self.inspector._measure_clocks()  # clocks drift over a long watch
        self.report.elapsed = time.monotonic() - t0
        self.report.notes.extend(n for n in self.inspector.report.notes if n not in self.report.notes)
        self._publish()
        self._log(log)
        return self.report

    def _reconnect_rows(self) -> None:
        from cdcd.inspect.rows import RowReader

        ins = self.inspector
        if not ins.rows.pg.closed:
            return
        try:
            fresh = RowReader(ins.rows.conninfo, ins.bucket, ins.rows.page)
            fresh.commit_timestamps = ins.rows.commit_timestamps
        except Exception:  # still down: the next round fails and comes back here
            return
        ins.rows = fresh

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.update(self.report.counter, self._new_staleness)
        self._new_staleness = []

    def _log(self, log: Any) -> None:
        c = self.report.counter
        nines = {f"nines_{format_bound(n.bound)}": n.text() for n in c.all()}
        log.info("watch", reads=c.reads, consistent=c.consistent, stale=c.stale, misses=c.misses,
                 unverifiable=c.unverifiable, unsettled=c.unsettled, max_staleness=round(c.max_staleness, 6),
                 errors=self.report.errors, **nines)


def run_watch(config: Config, *, bounds: tuple[float, ...], rate: float, batch: int, settle_timeout: float,
              duration: float | None, check_bound: float, min_nines: float | None, out: TextIO | None,
              json_output: bool = False, heartbeat: bool = True, clock_margin: float = 0.05,
              metrics: WatchMetrics | None = None, log_interval: float = 10.0,
              stop: threading.Event | None = None) -> WatchReport:
    """Watch until ``duration`` passed or ``stop`` is set, print the final table; ``exit_code`` is the verdict."""
    watcher = Watcher(config, bounds=bounds, rate=rate, batch=batch, settle_timeout=settle_timeout,
                      check_bound=check_bound, min_nines=min_nines, heartbeat=heartbeat, clock_margin=clock_margin,
                      metrics=metrics)
    try:
        report = watcher.run(duration, stop or threading.Event(), log_interval)
    finally:
        watcher.close()
    if out is not None:
        report.write(out, json_output)
    return report
