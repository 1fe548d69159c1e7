"""The daemon with several named Redis targets (``targets:``): one stream, planned once, applied to each.

The loop reads the source and plans each batch exactly as the single-target daemon does, then hands
it to every target's applier (:mod:`cdcd.targets`), each applying its backlog in order on its own
thread. A batch is acknowledged to the source only when every target applied it, so the source
checkpoint (slot flush position, Kafka offsets) is that of the slowest target: after a restart the
changes past it are replayed to all targets, and the faster ones refuse them as not newer.

A target that is down does not stop the others; its backlog grows until ``max_pending_changes``,
then the loop stops reading the source (backpressure: logged, counted, ``/readyz`` names the target)
rather than buffer without bound or drop anything. The source keeps what was not read (the slot
retains WAL, Kafka keeps offsets), and the keepalive keeps the replication session open meanwhile.
See docs/multi-target.md.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from threading import Condition
from typing import Any

import structlog

from cdcd.change import Rejected, Transaction
from cdcd.config import Config
from cdcd.daemon import Daemon
from cdcd.metrics import Metrics
from cdcd.retry import REDIS_ERRORS
from cdcd.rules import Batch, Rules
from cdcd.sinks.redis import RedisDeadLetters, sink_options
from cdcd.sources.base import HasWatermark, KeepsAlive, SlotSource, Source, SourceError, SourceUnavailable
from cdcd.targets import Pending, TargetApplier

log = structlog.get_logger("cdcd.daemon")

_KEEPALIVE_EVERY = 1.0  # seconds, while backpressure keeps the loop from reading the source
_DEFAULT_MAX_PENDING = 100_000  # a target given as plain redis settings (no max_pending_changes)


def build_daemon(config: Config, source: Source | None = None, rules: Rules | None = None,
                 metrics: Metrics | None = None) -> Daemon:
    """The daemon the configuration asks for: several targets (``targets:``) or one (``redis:``)."""
    if config.targets is not None:
        return MultiTargetDaemon(config, source=source, rules=rules, metrics=metrics)
    return Daemon(config, source=source, rules=rules, metrics=metrics)


class MultiTargetDaemon(Daemon):
    def __init__(self, config: Config, source: Source | None = None, rules: Rules | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(config, source, rules, metrics)
        self.progress = Condition()
        has_watermark = isinstance(self.source, HasWatermark)
        self.targets: list[TargetApplier] = []
        for i, (name, settings) in enumerate(config.target_settings().items()):
            self.targets.append(TargetApplier(
                name, self.redis if i == 0 else settings.client(), self.sequencer.run, self.rules, self.source.name,
                self.metrics, self.backoff, self.stop_event, self.progress,
                getattr(settings, "max_pending_changes", _DEFAULT_MAX_PENDING), config.daemon.heartbeat,
                has_watermark, sink_options(settings)))
        self.sink = self.targets[0].sink  # the first target's, for callers that look at "the" sink
        self._pending: deque[Pending] = deque()  # handed to the targets, not yet acknowledged to the source
        self._seq = 0
        self._submitted_version = 0
        self._held_by: set[str] = set()  # targets whose full backlog stops the loop reading the source
        self._last_keepalive = 0.0
        # Source records the daemon rejects go to every target's own dead-letter stream (through its
        # backlog, so a target that is down does not hold the others), unless they go to Kafka.
        self._dead_letters_per_target = isinstance(self.dead_letters, RedisDeadLetters)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        for t in self.targets:
            t.start()
        self._connect_source()
        self.ready.set()
        failures = 0
        try:
            while not self.stop_event.is_set():
                self.last_loop = time.monotonic()
                self._check_targets()
                try:
                    self._ack_applied()
                    if self._backpressure():
                        self._keepalive()
                        with self.progress:
                            self.progress.wait(0.2)
                        continue
                    # with batches out, wake often to acknowledge what the targets applied meanwhile
                    items = self._poll_source(0.02 if self._pending else 0.5)
                    if items or self.schema_guard.pending():
                        self._process(items)
                    elif not self._pending:
                        self.batch_log.idle()
                    self._offer_watermark()
                    failures = 0
                except SourceUnavailable as exc:
                    delay = self._source_lost(exc, failures)
                    failures += 1
                    # what the targets hold stays queued: applied, and acknowledged on the next session
                    # (a position every target applied may be acknowledged whenever); the source
                    # re-delivers from its checkpoint and the repeats are harmless
                    self.source.close()
                    if self._wait(delay):
                        break
                    self._connect_source()
        finally:
            self.stop_event.set()
            self._drain()
            self.dead_letters.close()
            log.info("stopped", batches=self.applied_batches)

    def _drain(self) -> None:
        """Stopping: targets that answer apply their backlog; what every target applied is acknowledged
        and flushed before the source closes; the rest is delivered again on the next start."""
        with self.progress:
            self.progress.notify_all()
        deadline = time.monotonic() + max(s.socket_timeout for s in self.config.target_settings().values()) + 5
        for t in self.targets:
            t.thread.join(max(0.0, deadline - time.monotonic()))
        try:
            with contextlib.suppress(SourceUnavailable):
                self._ack_applied()
            if self._pending:
                behind = [t.name for t in self.targets if t.backlog]
                log.warning("stopped_unacked", targets=behind, batches=len(self._pending),
                            detail="these targets were down while stopping: the batches they had not applied "
                                   "were not acknowledged and will be delivered again (to every target)")
        finally:
            self.batch_log.flush()
            self.source.close()

    def _check_targets(self) -> None:
        for t in self.targets:
            if t.failure is not None:
                raise RuntimeError(f"target {t.name} failed: {t.failure!r}") from t.failure

    def _process(self, items: Any) -> None:
        txns: list[Transaction] = []
        rejected: list[Rejected] = []
        for item in items:
            if not isinstance(item, Rejected):
                txns.append(item)
            elif self._dead_letters_per_target:
                self.metrics.errors.labels("rejected").inc()
                log.error("rejected", reason=item.reason, position=str(item.position), origin=item.origin)
                rejected.append(item)
            else:
                self._dead_letter(item)
        batch = self._plan(txns, max(self.last_version, self._submitted_version))
        self._submit([it.position for it in items], batch, rejected)

    def _submit(self, positions: list[Any], batch: Batch, rejected: Sequence[Rejected] = (),
                slot_check: bool = False) -> None:
        """Hand the batch to every target (each applies it in turn)."""
        self._seq += 1
        lsns = [p for p in positions if isinstance(p, int)]
        # what the backlog bound counts: row changes the batch holds writes for; a degraded transaction (its
        # rows were never kept, docs/huge-transactions-and-truncates.md) counts as one
        held = sum(n for (_, op), n in batch.counts.items() if op != "degraded") + batch.degraded_transactions
        item = Pending(self._seq, positions, batch, max(1, held), max(lsns) if lsns else None, list(rejected),
                       slot_check)
        self._pending.append(item)
        if batch.version:
            self._submitted_version = max(self._submitted_version, batch.version)
        with self.progress:
            for t in self.targets:
                t.enqueue(item)
            self.progress.notify_all()

    def _ack_applied(self) -> None:
        """Acknowledge to the source every batch all targets applied (the slowest one decides)."""
        if not self._pending:
            return
        with self.progress:
            done = min(t.applied_seq for t in self.targets)
        acked: list[Pending] = []
        while self._pending and self._pending[0].seq <= done:
            acked.append(self._pending.popleft())
        if not acked:
            return
        self.source.ack([p for item in acked for p in item.positions])
        for item in acked:
            self._count_acked(item.positions, item.batch, item.rtt, item.refused, item.tags)

    def _backpressure(self) -> bool:
        """True while some target's backlog is at its bound: the loop stops reading the source."""
        with self.progress:
            full = {t.name: (t.pending_changes, t.max_pending_changes) for t in self.targets if t.full()}
        for name in full.keys() - self._held_by:
            pending, bound = full[name]
            self.metrics.backpressure.labels(name).set(1)
            self.metrics.backpressure_events.labels(name).inc()
            log.warning("backpressure", target=name, pending_changes=pending, bound=bound,
                        detail=f"target {name} has {pending} changes not applied (max_pending_changes): reading the "
                               "source is paused until it catches up; nothing is dropped, the source keeps the rest")
        for name in self._held_by - full.keys():
            self.metrics.backpressure.labels(name).set(0)
            log.info("backpressure_released", target=name)
        self._held_by = set(full)
        return bool(full)

    def _keepalive(self) -> None:
        """Not reading the replication stream: tell the server we are alive (without acknowledging more)."""
        now = time.monotonic()
        if isinstance(self.source, KeepsAlive) and now - self._last_keepalive >= _KEEPALIVE_EVERY:
            self._last_keepalive = now
            self.source.keepalive()  # SourceUnavailable: reconnect, as when reading

    def _offer_watermark(self) -> None:
        """Each target announces its own watermark (its applied hash and messages); the source's is true for
        all of them (at most what every target acknowledged)."""
        if not isinstance(self.source, HasWatermark) or self._pending:
            # With batches out, the source's figure may stand for a session that ended while a target still
            # holds batches of it (it knows nothing of those): each target's own applied position is its
            # watermark then. With nothing out, every batch ever read was applied everywhere.
            return
        w = self.source.watermark()
        if w <= self._watermark_announced:
            return
        self._watermark_announced = w
        self.metrics.watermark.set(w)
        with self.progress:
            for t in self.targets:
                t.source_watermark = w
            self.progress.notify_all()
        self.source.watermark_published(w)

    def _check_slot_loss(self) -> None:
        """The slot is missing (a first start, or lost after use): each target asks itself, through its backlog
        and before anything newer, whether it applied changes from it, and if so invalidates everything
        derived from the rules' tables and forgets the source (``TargetApplier._used_the_lost_slot``)."""
        source = self.source
        if not isinstance(source, SlotSource) or source.slot_exists():
            return
        if not source.creates_slot:
            for t in self.targets:
                with contextlib.suppress(*REDIS_ERRORS):
                    if t.sink.applied_state().get("source") == source.name:
                        self.metrics.errors.labels("slot_lost").inc()
                        raise SourceError(f"replication slot of {source.name} was dropped and create_slot is off")
            return  # connect() says the slot is missing
        batch = Batch()
        batch.tags.update(r.table_tag for r in self.rules.by_relation.values())
        self._submit([], batch, slot_check=True)

    # ------------------------------------------------------------------ observation

    def _check_redis(self) -> None:
        for t in self.targets:
            t.ping()
            with self.progress:
                pending = t.pending_changes
            self.metrics.target_pending.labels(t.name).set(pending)
            self.metrics.target_lag.labels(t.name).set(t.lag_seconds())
        self.redis_ok = all(t.connected for t in self.targets)

    def liveness(self) -> tuple[bool, str]:
        """The loop never blocks on a target, so it must iterate whatever the targets do."""
        stuck = time.monotonic() - self.last_loop
        limit = 30 + 2 * self.config.daemon.retry_max
        if self.ready.is_set() and stuck > limit:
            return False, f"main loop has not iterated for {stuck:.0f}s"
        for t in self.targets:
            if t.failure is not None:
                return False, f"target {t.name} failed: {t.failure!r}"
        return True, "ok"

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if not self.ready.is_set():
            reasons.append("starting: not yet connected to the source")
        reasons.extend(self._source_reasons())
        max_age = self.config.monitor.ready_max_target_lag
        for t in self.targets:
            if not t.connected:
                reasons.append(f"target {t.name}: redis unavailable: {t.last_error or 'not connected yet'}")
            if t.name in self._held_by:
                reasons.append(f"target {t.name}: backlog full ({t.pending_changes} changes, max_pending_changes "
                               f"{t.max_pending_changes}): reading the source is paused")
            else:
                age = t.lag_seconds()
                if max_age is not None and age > max_age:
                    reasons.append(f"target {t.name}: lagging: {t.pending_changes} changes not applied, the oldest "
                                   f"read {age:.1f}s ago (bound {max_age}s); it holds the source checkpoint back")
        reasons.extend(self.schema_guard.reasons())
        return not reasons, reasons

    def status(self) -> dict[str, Any]:
        out = super().status()
        targets = {t.name: t.describe() for t in self.targets}
        out["targets"] = targets
        out["backplane_seq"] = {name: t["backplane_seq"] for name, t in targets.items()}  # each its own sequence
        out["slowest_target"] = max(targets, key=lambda n: (targets[n]["pending_changes"], targets[n]["lag_s"]))
        out["backpressure"] = sorted(self._held_by)
        return out
