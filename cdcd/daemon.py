"""The daemon loop: source -> change -> rules -> writes -> backplane -> checkpoint.

Batches reach Redis strictly in order, and Redis executes one while the daemon reads and plans the
next (the two used to take turns, each idle half the time)::

    items = source.poll()          # committed transactions only (no wait while a batch is in flight)
    batch = rules.plan(items)      # keys, values, tombstones, tag bumps: overlaps Redis executing N-1
    settle(N-1)                    # read N-1's replies (or apply it again until Redis says yes), then
                                   # source.ack(N-1's positions): only now may the checkpoint move
    pending = sink.begin(batch)    # send N on the sink's connection; its replies are read by settle

When the source has nothing more, the batch in flight is settled before the loop waits, and on stop
it is settled before the source closes. A batch is acknowledged only after all its replies were read,
and batch N is sent only after N-1 was settled: if Redis fails mid-reply, N-1 is applied again (writes
are versioned, a repeat is harmless) before anything newer goes out, so no later batch can be
acknowledged before an earlier one is applied.

Failures never lose a change: Redis down -> back off and retry the same batch
(the position does not move); source down -> reconnect and let it re-deliver
from its checkpoint; a malformed record -> dead-letter, count, log, continue.
Only configuration errors that need an operator end the process.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from redis.backoff import AbstractBackoff, EqualJitterBackoff

from cdcd.backplane import Sequencer
from cdcd.batchlog import BatchLog
from cdcd.change import Rejected, Transaction
from cdcd.config import Config
from cdcd.metrics import Metrics
from cdcd.ops import OpsServer
from cdcd.retry import REDIS_ERRORS as REDIS_ERRORS  # re-exported: the loop's retryable faults
from cdcd.retry import retry_delay as retry_delay  # re-exported
from cdcd.rules import Batch, Rules
from cdcd.sinks.base import DeadLetters
from cdcd.sinks.redis import ApplyResult, PendingApply, RedisDeadLetters, RedisSink, sink_options
from cdcd.sources.base import (
    GuardsSchema,
    HasWatermark,
    KeepsAlive,
    ReportsLag,
    SlotSource,
    Source,
    SourceError,
    SourceUnavailable,
    WaitsForVisibility,
)
from cdcd.sources.schemaguard import SchemaGuard

log = structlog.get_logger("cdcd.daemon")

# A source holding a commit the server does not show yet is not ready after this long: short waits (a
# busy machine's milliseconds) must not flap readiness; a synchronous standby that stopped answering does.
VISIBILITY_NOT_READY_AFTER = 5.0


class HttpBindError(OSError):
    """The ops HTTP server could not bind its address: a configuration problem (``http.port``)."""


@dataclass(slots=True)
class _InFlight:
    """A batch sent to Redis, not yet settled: neither its replies read nor its positions acknowledged."""

    positions: list[Any]  # only these, not the decoded transactions: those are freed once planned
    batch: Batch
    pending: PendingApply | None
    error: BaseException | None = None  # sending failed: settle applies it again, with retries

    def first_attempt(self) -> ApplyResult:
        if self.pending is None:
            assert self.error is not None
            raise self.error
        return self.pending.wait()


class Daemon:
    def __init__(self, config: Config, source: Source | None = None, rules: Rules | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.rules = rules or config.rules()
        self.metrics = metrics or Metrics()
        self.source: Source = source or self._make_source()
        # Postgres binds rules to OIDs in its own guard; other sources get the record field-list check.
        self.schema_guard: SchemaGuard = (self.source.schema_guard if isinstance(self.source, GuardsSchema)
                                          else SchemaGuard(self.rules.source, check_rows=True))
        self.sequencer = Sequencer("cdcd")
        # the single target (redis:), or the first of targets: (a multi-target daemon's dead letters go there)
        rs = next(iter(config.target_settings().values()))
        self.redis = rs.client()
        self.sink = RedisSink(self.redis, self.rules, self.sequencer, self.source.name, **sink_options(rs))
        self.dead_letters: DeadLetters = self._make_dead_letters()
        # exponential with equal jitter, so a fleet does not retry in lockstep
        self.backoff: AbstractBackoff = EqualJitterBackoff(cap=config.daemon.retry_max,
                                                           base=config.daemon.retry_initial)
        self.stop_event = threading.Event()
        self.ready = threading.Event()  # connected to the source and Redis at least once
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.applied_batches = 0
        self.applied_changes = 0
        self.on_batch: Callable[[Batch, ApplyResult], None] | None = None  # hook for the demo and tests
        self.started_at = time.time()
        self.last_loop = time.monotonic()
        self.last_batch_at: float | None = None
        self.last_version = 0
        self._watermark_announced = 0
        self.redis_ok = False
        self.source_ok = False
        self.source_stats: dict[str, Any] | None = None  # from the monitor: slot lag / retained WAL
        self.lag_alarm = False
        self._rate: deque[tuple[float, int]] = deque(maxlen=600)
        self.http: OpsServer | None = None
        self.debug = config.log.level == "debug"
        self._last_publish = time.monotonic()
        self._inflight: _InFlight | None = None
        self.exists_keeper: Any = None  # cdcd.exists_keeper.ExistsKeeper, when rules have existence filters
        if self.rules.exists:
            from cdcd.exists_keeper import ExistsKeeper  # psycopg2: only where filters are configured

            self.exists_keeper = ExistsKeeper(config, self.rules, self.sink, self.metrics, self.stop_event)
        self.batch_log = BatchLog(log.info, 0.0 if self.debug else config.log.batch_interval)

    def _make_source(self) -> Source:
        from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings

        if isinstance(self.config.source, KafkaSourceSettings):
            return KafkaSource(self.config.source)
        from cdcd.sources.postgres import PostgresSource

        return PostgresSource(self.config.source, self.rules.source, reads=self.rules.reads)

    def _make_dead_letters(self) -> DeadLetters:
        from cdcd.sources.kafka import KafkaSourceSettings

        src = self.config.source
        where = self.config.daemon.dead_letters or ("kafka" if isinstance(src, KafkaSourceSettings) else "redis")
        if where == "kafka":
            if not isinstance(src, KafkaSourceSettings):
                raise SourceError("daemon.dead_letters: kafka needs source type kafka (its cluster and credentials)")
            from cdcd.sinks.kafka_dlq import KafkaDeadLetters

            return KafkaDeadLetters.from_settings(src)
        return RedisDeadLetters(self.redis, self.rules.keyspace.dead_letters)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.info("stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when stopping."""
        return self.stop_event.wait(seconds)

    def _retry_redis(self, what: str, fn: Callable[[], Any], first: Callable[[], Any] | None = None) -> Any:
        """``fn()`` until it succeeds (``first()`` instead for the first attempt); raises RedisError only
        when asked to stop meanwhile."""
        failures = 0
        attempt = first or fn
        while True:
            try:
                result = attempt()
                self.metrics.connected.labels("redis").set(1)
                self.redis_ok = True
                return result
            except REDIS_ERRORS as exc:
                attempt = fn
                self.metrics.connected.labels("redis").set(0)
                self.metrics.retries.labels("redis").inc()
                self.redis_ok = False
                self._error(f"redis: {exc}")
                delay = retry_delay(self.backoff, failures)
                failures += 1
                log.warning("redis_unavailable", during=what, error=str(exc), retry_in=round(delay, 3))
                if isinstance(self.source, KeepsAlive):
                    # if it fails, the source reconnects after this batch; nothing was acked
                    with contextlib.suppress(SourceUnavailable):
                        self.source.keepalive()
                if self._wait(delay):
                    if isinstance(exc, redis.RedisError):
                        raise
                    raise redis.ConnectionError(str(exc)) from exc

    def _connect_source(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                self._check_slot_loss()
                self.source.connect()
                self.metrics.connected.labels("source").set(1)
                self.source_ok = True
                return
            except SourceUnavailable as exc:
                self.metrics.connected.labels("source").set(0)
                self.metrics.retries.labels("source").inc()
                self.source_ok = False
                self._error(f"source: {exc}")
                delay = retry_delay(self.backoff, failures)
                failures += 1
                log.warning("source_unavailable", error=str(exc), retry_in=round(delay, 3))
                self._wait(delay)

    def _check_slot_loss(self) -> None:
        """A slot that vanished after we used it means changes were lost: invalidate everything derived."""
        source = self.source
        if not isinstance(source, SlotSource):
            return
        state = self._retry_redis("read applied state", self.sink.applied_state)
        if state.get("source") != source.name or source.slot_exists():
            return
        self.metrics.errors.labels("slot_lost").inc()
        log.error("slot_lost", slot=self.source.name, last_version=state.get("version"),
                  detail="the replication slot this daemon used is gone: changes since were lost. Every table tag "
                         "is bumped so entries derived from the rules' tables are invalidated; tombstone-less keys "
                         "(plain cache entries written outside cdcd) may stay stale until their TTL")
        if not source.creates_slot:
            raise SourceError(f"replication slot of {source.name} was dropped and create_slot is off")
        batch = Batch()
        batch.tags.update(r.table_tag for r in self.rules.by_relation.values())
        batch.exists_reset.update(self.rules.exists)  # the lost changes' inserts are in no filter
        self._retry_redis("invalidate after slot loss", lambda: self.sink.apply(batch))
        self._retry_redis("reset applied source", self.sink.forget_source)

    def _error(self, text: str) -> None:
        self.last_error = text
        self.last_error_at = time.time()

    def run(self) -> None:
        """Run until stop(); raises SourceError for problems an operator must fix."""
        cfg = self.config
        log.info("starting", source=self.source.name, tables=sorted(self.rules.by_relation),
                 prefix=self.rules.keyspace.prefix, channel=self.rules.keyspace.channel, run=self.sequencer.run)
        if cfg.http.enabled and self.http is None:
            self.start_http()
        monitor = threading.Thread(target=self._monitor, name="cdcd-monitor", daemon=True)
        monitor.start()
        try:
            self._run()
        finally:
            self.stop_event.set()
            monitor.join(5)
            if self.exists_keeper is not None:
                self.exists_keeper.join(10)
            if self.http is not None:
                self.http.stop()
                self.http = None

    def start_http(self) -> None:
        """Serve /metrics, /healthz, /readyz, /status; raises HttpBindError when the address cannot be bound
        (the only OSError the CLI reports as an HTTP problem)."""
        cfg = self.config
        try:
            http = self.http = OpsServer(self, cfg.http.host, cfg.http.port).start()
        except OSError as exc:
            raise HttpBindError(exc.errno, exc.strerror) from exc
        log.info("http_listening", host=cfg.http.host, port=http.port,
                 routes=["/metrics", "/healthz", "/readyz", "/status"])

    def _run(self) -> None:
        cfg = self.config
        try:
            self._retry_redis("prepare", self.sink.prepare)
        except redis.RedisError:
            return  # stopped while Redis was down
        self._connect_source()
        self.ready.set()
        if self.exists_keeper is not None:
            self.exists_keeper.start()
        failures = 0
        try:
            while not self.stop_event.is_set():
                self.last_loop = time.monotonic()
                try:
                    # With a batch in flight, take only what the source already has: planning it
                    # overlaps Redis executing the batch. With nothing there, settle the batch first.
                    items = self._poll_source(0 if self._inflight is not None else 0.5)
                    if items or self.schema_guard.pending():
                        self._process(items)
                        self._last_publish = time.monotonic()
                    elif self._inflight is not None:
                        self._settle()
                    else:
                        self.batch_log.idle()
                        if cfg.daemon.heartbeat and time.monotonic() - self._last_publish >= cfg.daemon.heartbeat:
                            self._heartbeat()
                    # announced on its own only with nothing in flight (as the heartbeat): its message must not
                    # overtake a sent batch's; with a batch in flight the next batch's messages carry it
                    self._watermark(idle=not items and self._inflight is None)
                    failures = 0
                except SourceUnavailable as exc:
                    delay = self._source_lost(exc, failures)
                    failures += 1
                    try:
                        # read from the lost session: applied, and acked if the source still can
                        self._settle(source_lost=True)
                    except redis.RedisError:
                        break  # stopping while Redis is down: not acked, re-delivered
                    self.source.close()
                    if self._wait(delay):
                        break
                    self._connect_source()
                except redis.RedisError:
                    break  # only raised out of _retry_redis when stopping: the batch was not acked
        finally:
            # Stopping (or failing): the batch in flight is applied and acked before the source closes. Set
            # first so that Redis being down ends the retries at once instead of holding the exit forever.
            self.stop_event.set()
            try:
                self._settle(source_lost=True)
            except redis.RedisError:
                log.warning("stopped_unacked", detail="Redis was down while stopping: the batch in flight was "
                                                      "not acknowledged and will be delivered again")
            finally:
                self.batch_log.flush()
                self.source.close()
            self.dead_letters.close()
            log.info("stopped", batches=self.applied_batches)

    # ------------------------------------------------------------------ one batch

    def _process(self, items: Any) -> None:
        txns: list[Transaction] = []
        for item in items:
            if isinstance(item, Rejected):
                self._dead_letter(item)
            else:
                txns.append(item)
        version = self.last_version  # what a schema-guard transaction of its own is versioned at
        if self._inflight is not None and self._inflight.batch.version:
            version = max(version, self._inflight.batch.version)
        batch = self._plan(txns, version)
        self._settle()  # the previous batch: applied and acked before this one may go out
        self._send(items, batch)

    def _poll_source(self, timeout: float) -> Sequence[Transaction | Rejected]:
        """``source.poll`` plus the visibility waits it went through (metrics)."""
        items = self.source.poll(timeout)
        if isinstance(self.source, WaitsForVisibility):
            counts = self.source.visibility_counts()
            m = self.metrics
            if counts.waits:
                m.visibility_waits.inc(counts.waits)
            if counts.checks:
                m.visibility_checks.inc(counts.checks)
            for seconds in counts.durations:
                m.visibility_wait.observe(seconds)
        return items

    def visibility_reasons(self) -> list[str]:
        """Readiness: the source has held a commit the server does not show for too long."""
        if not isinstance(self.source, WaitsForVisibility):
            return []
        wait = self.source.visibility_wait()
        if wait is None:
            return []
        waited = time.monotonic() - wait.since
        if waited < VISIBILITY_NOT_READY_AFTER:
            return []
        return [f"waiting for visibility of xid {wait.xid} for {waited:.0f}s: its commit is in the WAL but the "
                f"server does not show it yet (synchronous_standby_names? a standby that does not answer); later "
                f"transactions wait behind it"]

    def _visibility_status(self) -> dict[str, Any] | None:
        wait = self.source.visibility_wait() if isinstance(self.source, WaitsForVisibility) else None
        if wait is None:
            return None
        return {"xid": wait.xid, "waited_s": round(time.monotonic() - wait.since, 3), "checks": wait.queries}

    def _plan(self, txns: list[Transaction], version: int) -> Batch:
        """Schema guard, then the rules: the batch of writes for these transactions (``version``: what a
        schema-guard transaction of its own is versioned at)."""
        m = self.metrics
        txns = self.schema_guard.filter(txns, version)
        self._schema_events()
        batch = self.rules.plan(txns)
        if self.debug:
            for t in txns:
                for c in t.changes:
                    log.debug("change", table=c.relation, op=c.op.name.lower(), version=t.version, xid=t.xid)
        for p in batch.problems:
            m.problems.labels(p.kind, p.relation).inc()
            log.warning(p.kind, table=p.relation, detail=p.detail, position=str(p.position))
        return batch

    def _send(self, items: Sequence[Any], batch: Batch) -> None:
        """Send the batch; its replies are read by :meth:`_settle`. If sending fails, settle at once
        (applying it again with retries): nothing newer may go out before it is applied."""
        positions = [it.position for it in items]
        try:
            self._inflight = _InFlight(positions, batch, self.sink.begin(batch))
        except REDIS_ERRORS as exc:
            self._inflight = _InFlight(positions, batch, None, exc)
            self._settle()

    def _settle(self, source_lost: bool = False) -> None:
        """The batch in flight: read its replies (on failure apply it again until Redis says yes), then
        dead-letter refused writes and acknowledge its positions. ``source_lost``: the source it came
        from may be gone; an ack it cannot take is dropped (the batch is re-delivered, harmlessly)."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return
        batch = flight.batch
        result: ApplyResult = self._retry_redis("apply", lambda: self.sink.apply(batch), flight.first_attempt)
        self._refused(result)
        try:
            self.source.ack(flight.positions)
        except SourceUnavailable:
            if not source_lost:
                raise
            log.debug("ack_dropped", detail="the source session is gone; the batch is delivered again")
            return
        self._account(flight.positions, batch, result)

    def _account(self, positions: Sequence[Any], batch: Batch, result: ApplyResult) -> None:
        """Counters, metrics and the batch log of an applied and acknowledged batch."""
        self.metrics.count_apply(result)
        self._count_acked(positions, batch, result.rtt, result.refused, result.tags)
        if self.on_batch is not None:
            self.on_batch(batch, result)

    def _count_acked(self, positions: Sequence[Any], batch: Batch, rtt: float, refused: int, tags: int) -> None:
        """What counts once per batch acknowledged to the source, however many targets applied it."""
        m = self.metrics
        now = time.time()
        self.applied_batches += 1
        self.applied_changes += sum(batch.counts.values())
        self.last_batch_at = now
        self._rate.append((time.monotonic(), self.applied_changes))
        if batch.version:
            self.last_version = batch.version
        for (table, op), n in batch.counts.items():
            m.changes.labels(table, op).inc(n)
        m.transactions.inc(batch.transactions)
        m.batches.inc()
        if batch.degraded_transactions:
            m.degraded_transactions.inc(batch.degraded_transactions)
            m.degraded_changes.inc(batch.degraded_changes)
        if batch.commit_ts:
            m.commit_to_apply.observe(max(0.0, now - batch.commit_ts))
        if batch.version:
            m.version.set(batch.version)
        lsns = [p for p in positions if isinstance(p, int)]
        if lsns:
            m.position.set(max(lsns))
        self.batch_log.add(batch.transactions, sum(batch.counts.values()), len(batch.writes), refused, tags,
                           batch.version, rtt,
                           (now - batch.oldest_commit_ts) * 1000 if batch.oldest_commit_ts else None)

    def _refused(self, result: ApplyResult) -> None:
        """Writes Redis refused for good were repaired by the sink; count, log and dead-letter each one
        (before the batch is acknowledged, so a crash re-delivers rather than loses the record)."""
        if result.restored:
            self._restored()
        for r in result.refusals:
            self.metrics.redis_refused.labels(r.reason).inc()
            log.error("redis_refused", key=r.key, kind=r.kind, reason=r.reason, error=r.error, version=r.version,
                      detail="the key was made safe (tombstoned or reset) and the stream goes on; see the "
                             "dead letter")
            rejected = Rejected(reason=f"redis_refused:{r.reason}: {r.error}", position=str(r.version),
                                origin=f"redis:{r.kind}", key=r.key)
            self._retry_redis("dead-letter", functools.partial(self.dead_letters.send, rejected))
            self.metrics.dead_letters.inc()

    def _restored(self) -> None:
        self.metrics.redis_restores.inc()
        log.warning("redis_restored", detail="Redis had lost cdcd's registry (restart, flush or failover): "
                                              "registry and table counters were restored")

    def _schema_events(self) -> None:
        for b in self.schema_guard.take_events():
            self.metrics.schema_changes.labels(b.relation, b.kind).inc()
            self._error(b.reason)
            log.error("schema_change", table=b.relation, kind=b.kind, seen=b.seen, fix=b.fix, detail=b.reason)

    def _heartbeat(self) -> None:
        """An empty message with the next sequence number: a subscriber that missed the last real message
        sees the gap now instead of at the next change. If it cannot be sent, the number is spent anyway,
        which subscribers read as a gap: the safe direction."""
        self._last_publish = time.monotonic()
        try:
            if self.sink.idle_heartbeat(self.last_version):
                self._restored()
        except REDIS_ERRORS as exc:
            log.debug("heartbeat_failed", error=str(exc))

    def _watermark(self, idle: bool) -> None:
        """Move the applied watermark (docs/read-your-writes.md). Once Redis acknowledged a position it is
        stamped on every later backplane message; while the stream is idle it is announced on its own, so a
        read-your-writes waiter never waits for the next change."""
        if not isinstance(self.source, HasWatermark):
            return  # a source without one (Kafka): messages carry none, waiters time out (documented)
        w = self.source.watermark()
        if w <= self._watermark_announced:
            return
        self.sequencer.watermark = str(w)
        if not idle:
            return  # the next batch's messages carry it; if none comes, poll() returns early for it
        self._last_publish = time.monotonic()
        try:
            self.sink.announce_watermark(self.last_version)
        except REDIS_ERRORS as exc:
            # The number is spent (subscribers see a gap, the safe direction); retried on the next loop,
            # not in a spin: poll() waits normally again. Later batches carry the watermark anyway.
            log.debug("watermark_announce_failed", error=str(exc))
        else:
            self._watermark_announced = w
            self.metrics.watermark.set(w)
        self.source.watermark_published(w)

    def _dead_letter(self, rejected: Rejected) -> None:
        self.metrics.errors.labels("rejected").inc()
        log.error("rejected", reason=rejected.reason, position=str(rejected.position), origin=rejected.origin)
        self._retry_redis("dead-letter", lambda: self.dead_letters.send(rejected))
        self.metrics.dead_letters.inc()

    # ------------------------------------------------------------------ observation

    def _monitor(self) -> None:
        """Slot lag and retained WAL (or consumer lag) every ``monitor.interval``; warns past the bound."""
        mon = self.config.monitor
        while not self.stop_event.wait(mon.interval if self.source_stats is not None else 0.2):
            self._check_redis()
            if not isinstance(self.source, ReportsLag):
                continue
            try:
                stats = self.source.lag_stats()
            except Exception as exc:  # the monitor must never take the daemon down
                log.debug("monitor_failed", error=str(exc))
                continue
            self.source_stats = stats or {}
            if not stats:
                continue
            if "lag_bytes" in stats:
                self.metrics.slot_lag.set(stats["lag_bytes"])
            retained = stats.get("retained_bytes")
            if retained is not None:
                self.metrics.slot_retained.set(retained)
                over = retained > mon.max_retained_wal
                self.metrics.lag_alarm.set(1 if over else 0)
                if over:
                    log.warning("slot_retains_too_much_wal", retained_bytes=retained, bound=mon.max_retained_wal,
                                detail="the slot keeps WAL until cdcd acknowledges it; if cdcd cannot catch up the "
                                       "server's disk fills. Fix cdcd (or Redis) rather than dropping the slot: "
                                       "dropping it loses changes and forces a full invalidation")
                self.lag_alarm = over

    def _check_redis(self) -> None:
        """The monitor's look at Redis (a target that fails while idle is noticed here)."""
        try:
            self.redis.ping()
            self.redis_ok = True
        except REDIS_ERRORS as exc:
            self.redis_ok = False
            self._error(f"redis: {exc}")
        self.metrics.connected.labels("redis").set(1 if self.redis_ok else 0)

    def liveness(self) -> tuple[bool, str]:
        """Alive unless the main loop is stuck (it iterates at least every poll timeout or retry)."""
        stuck = time.monotonic() - self.last_loop
        limit = 30 + 2 * self.config.daemon.retry_max + self.config.redis.socket_timeout
        if self.ready.is_set() and self.redis_ok and stuck > limit:
            return False, f"main loop has not iterated for {stuck:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if not self.ready.is_set():
            reasons.append("starting: not yet connected to the source and Redis")
        if not self.redis_ok:
            reasons.append(f"redis unavailable: {self.last_error or 'not connected yet'}")
        reasons.extend(self._source_reasons())
        reasons.extend(self.schema_guard.reasons())
        return not reasons, reasons

    def _source_reasons(self) -> list[str]:
        """Why the source side is not ready (down, or further behind than ``monitor.ready_max_lag``)."""
        reasons = []
        if not self.source_ok:
            reasons.append(f"source unavailable: {self.last_error or 'not connected yet'}")
        bound = self.config.monitor.ready_max_lag
        lag = (self.source_stats or {}).get("lag_bytes")
        if bound is not None and lag is not None and lag > bound:
            reasons.append(f"lagging: {lag} bytes behind (bound {bound})")
        reasons.extend(self.visibility_reasons())
        return reasons

    def _source_lost(self, exc: SourceUnavailable, failures: int) -> float:
        """Record a lost source session (metrics, readiness, log); the delay before reconnecting."""
        self.metrics.connected.labels("source").set(0)
        self.metrics.errors.labels("source").inc()
        self.source_ok = False
        self._error(f"source: {exc}")
        delay = retry_delay(self.backoff, failures)
        log.warning("source_lost", error=str(exc), retry_in=round(delay, 3))
        return delay

    def rate(self, window: float = 10.0) -> float:
        """Changes per second over the last ``window`` seconds."""
        now = time.monotonic()
        samples = [(t, n) for t, n in self._rate if now - t <= window]
        if not samples:
            return 0.0
        first_t, first_n = samples[0]
        older = [(t, n) for t, n in self._rate if now - t > window]
        if older:
            first_t, first_n = older[-1]
        span = max(now - first_t, 1e-3)
        return (self.applied_changes - first_n) / span

    def status(self) -> dict[str, Any]:
        ready, reasons = self.readiness()
        return {
            "source": self.source.name,
            "run": self.sequencer.run,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": ready,
            "not_ready_because": reasons,
            "redis_connected": self.redis_ok,
            "source_connected": self.source_ok,
            "position": self.source.describe(),
            "applied_version": self.last_version,
            "backplane_seq": self.sequencer.seq,
            "batches": self.applied_batches,
            "changes": self.applied_changes,
            "rate_10s": round(self.rate(10), 1),
            "rate_60s": round(self.rate(60), 1),
            "last_batch_age_s": round(time.time() - self.last_batch_at, 1) if self.last_batch_at else None,
            "lag": self.source_stats,
            "waiting_for_visibility": self._visibility_status(),
            "lag_alarm": self.lag_alarm,
            "retained_wal_bound": self.config.monitor.max_retained_wal,
            "exists_filters": ({rel: dict(st) for rel, st in self.exists_keeper.state.items()}
                               if self.exists_keeper is not None else {}),
            "last_error": self.last_error,
            "last_error_age_s": round(time.time() - self.last_error_at, 1) if self.last_error_at else None,
        }
