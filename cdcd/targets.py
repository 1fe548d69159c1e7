"""One Redis target of a multi-target daemon: its own sink, backplane, backlog and backoff.

Why a thread per target: a target that is down (or hangs until its socket timeout) must not stop the
others. Each applier takes the batches the daemon loop planned, in order, from its own backlog and applies
them to its Redis exactly as the single-target loop does (versioned writes, tag bumps, applied state,
backplane, registry check), retrying with its own backoff while Redis is down. The daemon loop reads
the source, plans each batch once, hands the same :class:`Pending` to every applier, and acknowledges a
batch to the source only once every applier has applied it (``applied_seq``), so the slowest target
holds the checkpoint back and a restart replays to everyone (harmless: writes are versioned).

The backlog holds references to batches (planned once, shared by all targets); the daemon bounds it by
``max_pending_changes`` per target and stops reading the source at the bound instead of buffering more.
Everything the loop and an applier share (the backlog, ``pending_changes``, ``applied_seq``) is
read and written under the daemon's ``progress`` condition, which also wakes whoever waits for it.
See docs/multi-target.md.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.backoff import AbstractBackoff

from cdcd.backplane import Sequencer
from cdcd.change import Rejected
from cdcd.metrics import Metrics
from cdcd.retry import REDIS_ERRORS, retry_delay
from cdcd.rules import Batch, Rules
from cdcd.sinks.redis import ApplyResult, RedisDeadLetters, RedisSink

log = structlog.get_logger("cdcd.targets")

# A backlog of several batches (a target catching up, or a slot drain where the loop reads ahead) leaves
# in one go: up to this many batches, or until this many changes, are sent before the first reply is
# read, so Redis works on one while the next is packed and a catch-up is not one round trip per batch.
PIPELINE_BATCHES = 32
PIPELINE_CHANGES = 10_000


@dataclass(slots=True, eq=False)
class Pending:
    """A planned batch on its way to every target; acknowledged to the source once each applied it."""

    seq: int  # 1, 2, 3... in source order: a target that applied ``seq`` applied everything before it
    positions: list[Any]
    batch: Batch
    changes: int  # row changes it stands for (at least 1): what the backlog bound counts
    top: int | None  # highest integer position (a Postgres LSN): the targets' applied position
    rejected: list[Rejected] = field(default_factory=list)  # dead letters every target records first
    slot_check: bool = False  # the slot was missing: invalidate (and forget the source) where it had been used
    at: float = field(default_factory=time.monotonic)
    rtt: float = 0.0  # the slowest target's round trip (the batch log's redis_ms)
    refused: int = 0  # summed over targets
    tags: int = 0


class TargetApplier:
    """Applies the daemon's batches to one Redis, in order, on a thread of its own."""

    def __init__(self, name: str, client: Any, run: str, rules: Rules, source_name: str, metrics: Metrics,
                 backoff: AbstractBackoff, stop: threading.Event, progress: threading.Condition,
                 max_pending_changes: int, heartbeat: float, has_watermark: bool,
                 sink_options: dict[str, Any] | None = None) -> None:
        self.name = name
        self.client = client
        # the daemon's run id, its own numbers: subscribers of this Redis see this target's messages without gaps
        self.sequencer = Sequencer("cdcd", run)
        self.sink = RedisSink(client, rules, self.sequencer, source_name, **(sink_options or {}))
        self.dead_letters = RedisDeadLetters(client, rules.keyspace.dead_letters)
        self.metrics = metrics
        self.backoff = backoff
        self.stop = stop
        self.progress = progress
        self.max_pending_changes = max_pending_changes
        self.heartbeat = heartbeat
        self.has_watermark = has_watermark
        # shared with the daemon loop, under ``progress``
        self.backlog: deque[Pending] = deque()
        self.pending_changes = 0
        self.applied_seq = 0
        # written by this applier only
        self.applied_position = 0
        self.applied_version = 0
        self.connected = False
        self.last_error: str | None = None
        self.failure: BaseException | None = None  # a bug, not an outage: the daemon stops on it
        # offered by the daemon loop: a watermark true for every target (docs/read-your-writes.md)
        self.source_watermark = 0
        self._announced = 0
        self._last_publish = time.monotonic()
        self._idle_retry_at = 0.0  # after a failed announcement: not again before this (no spin while down)
        self._ready: dict[int, ApplyResult] = {}  # batches after the head applied in its pipeline, by seq
        self.thread = threading.Thread(target=self._run, name=f"cdcd-target-{name}", daemon=True)
        metrics.target_connected.labels(name).set(0)
        metrics.backpressure.labels(name).set(0)

    # ------------------------------------------------------------------ the daemon loop's side

    def enqueue(self, item: Pending) -> None:
        """Called under ``progress``."""
        self.backlog.append(item)
        self.pending_changes += item.changes

    def full(self) -> bool:
        return self.pending_changes >= self.max_pending_changes

    def lag_seconds(self) -> float:
        """Age of the oldest batch not applied yet (0 when caught up)."""
        with self.progress:
            oldest = self.backlog[0].at if self.backlog else None
        return 0.0 if oldest is None else time.monotonic() - oldest

    def describe(self) -> dict[str, Any]:
        with self.progress:
            batches, changes, applied = len(self.backlog), self.pending_changes, self.applied_seq
        return {"connected": self.connected, "applied_position": self.applied_position,
                "applied_version": self.applied_version, "applied_batches": applied, "pending_batches": batches,
                "pending_changes": changes, "max_pending_changes": self.max_pending_changes,
                "lag_s": round(self.lag_seconds(), 3),
                "backplane_seq": self.sequencer.seq, "last_error": self.last_error}

    def ping(self) -> None:
        """The monitor's look at an idle target (a failing one notices by itself)."""
        try:
            self.client.ping()
        except REDIS_ERRORS as exc:
            self._down(f"{exc}")
        else:
            self._up()

    # ------------------------------------------------------------------ the applier thread

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: surface it to the daemon loop, which stops
            self.failure = exc
            log.exception("target_failed", target=self.name)
        finally:
            with self.progress:
                self.progress.notify_all()

    def _next(self) -> Pending | None:
        """The oldest batch not applied yet; None when stopping with nothing left or when idle work is due."""
        with self.progress:
            while not self.backlog and not self.stop.is_set() and not self._idle_due():
                self.progress.wait(0.2)
            return self.backlog[0] if self.backlog else None

    def _loop(self) -> None:
        prepared = False
        failures = 0
        done_rejected = done_refusals = 0  # the item whose dead letters are written: a retry does not repeat them
        result: ApplyResult | None = None
        alone = False  # after a failure: the next batch is applied by itself, through the sink's retry path
        slot_checked, slot_used = 0, False  # the slot-check item asked about, and the answer
        while True:
            item = self._next()
            if item is None:
                if self.stop.is_set():
                    return
                self._idle()
                continue
            try:
                if not prepared:
                    self.sink.prepare()
                    prepared = True
                if done_rejected != item.seq:
                    for rejected in item.rejected:
                        self.dead_letters.send(rejected)
                        self.metrics.dead_letters.inc()
                    done_rejected = item.seq
                if result is None:
                    result = self._ready.pop(item.seq, None)
                if result is None and item.slot_check:
                    if slot_checked != item.seq:
                        slot_used, slot_checked = self._used_the_lost_slot(), item.seq
                    if not slot_used:
                        result = ApplyResult(0, 0, 0, 0, 0, 0, 0.0)  # this Redis never held that slot's changes
                if result is None:
                    result = self._apply(item, pipelined=not alone)
                    alone = False
                if done_refusals != item.seq:
                    self._refused(result)
                    done_refusals = item.seq
                if item.slot_check and slot_used:
                    self.sink.forget_source()
            except REDIS_ERRORS as exc:
                alone = True
                delay = retry_delay(self.backoff, failures)
                failures += 1
                self.metrics.retries.labels(f"redis:{self.name}").inc()
                self._down(str(exc))
                log.warning("redis_unavailable", target=self.name, during="apply" if prepared else "prepare",
                            error=str(exc), retry_in=round(delay, 3), pending_changes=self.pending_changes)
                if self.stop.wait(delay):
                    log.info("target_stopped_behind", target=self.name, pending_batches=len(self.backlog),
                             detail="stopping while this Redis is down: the rest is delivered again on the "
                                    "next start (the source checkpoint did not pass it)")
                    return
                continue
            failures = 0
            self._up()
            self._applied(item, result)
            result = None

    def _used_the_lost_slot(self) -> bool:
        """The source's slot was missing at (re)connect: did this Redis apply changes from it? Then changes
        were lost in between, and the batch (every table tag) invalidates what derives from them here.
        Asked of each target itself, when it answers, so a target that is down at start is neither skipped
        nor invalidated on a guess."""
        if self.sink.applied_state().get("source") != self.sink.source_name:
            return False
        self.metrics.errors.labels("slot_lost").inc()
        log.error("slot_lost", target=self.name, slot=self.sink.source_name,
                  detail="the replication slot this target was fed from is gone: changes since were lost. Every "
                         "table tag is bumped here so entries derived from the rules' tables are invalidated; "
                         "tombstone-less keys (plain cache entries written outside cdcd) may stay stale until "
                         "their TTL")
        return True

    def _apply(self, head: Pending, pipelined: bool) -> ApplyResult:
        """Apply ``head``; with ``pipelined``, the batches queued behind it that may leave before its replies
        are read go in the same stream (their results wait in ``_ready``, in order, for their turn). After
        a failure the head is applied alone, through the sink's retry path (which restores scripts and
        registry after a Redis restart) before anything is pipelined again."""
        group = self._group(head) if pipelined else [head]
        if len(group) == 1:
            return self.sink.apply(head.batch)
        out: ApplyResult | None = None
        try:
            pendings = [self.sink.begin(it.batch) for it in group]
            for it, pending in zip(group, pendings, strict=True):
                result = pending.wait()
                if out is None:
                    out = result
                else:
                    self._ready[it.seq] = result
        except BaseException:
            self.sink.drop_connection()  # later batches' replies may still be on it
            if out is not None:
                self._ready[head.seq] = out  # applied: only the rest is tried again
            raise
        assert out is not None
        return out

    def _group(self, head: Pending) -> list[Pending]:
        with self.progress:
            queued = list(itertools.islice(self.backlog, 1, PIPELINE_BATCHES))
        group, changes = [head], head.changes
        for it in queued:
            if changes >= PIPELINE_CHANGES or it.rejected or it.slot_check or self._moves_epochs(group[-1]):
                break
            group.append(it)
            changes += it.changes
        return group

    def _moves_epochs(self, item: Pending) -> bool:
        """A batch that bumps a table's counter (TRUNCATE, degraded transaction) or raises a floor: the values
        after it must record the counter its replies return, so they are packed only once those were read."""
        return bool(item.batch.floors) or any(t in self.sink.epochs for t in item.batch.tags)

    def _applied(self, item: Pending, result: ApplyResult) -> None:
        if result.restored:
            self.metrics.redis_restores.inc()
            log.warning("redis_restored", target=self.name, detail="this Redis had lost cdcd's registry (restart, "
                                                                   "flush or failover): registry and table counters "
                                                                   "were restored")
        if item.top is not None and item.top > self.applied_position:
            self.applied_position = item.top
            self.metrics.target_position.labels(self.name).set(item.top)
        if item.batch.version:
            self.applied_version = max(self.applied_version, item.batch.version)
        if self.has_watermark:
            # everything up to it is in this Redis: the next batch's messages and applied state carry it
            self.sequencer.watermark = str(self._watermark())
        self.metrics.count_apply(result)
        self.metrics.target_batches.labels(self.name).inc()
        self._last_publish = time.monotonic()
        with self.progress:
            self.backlog.popleft()
            self.pending_changes -= item.changes
            self.applied_seq = item.seq
            item.rtt = max(item.rtt, result.rtt)
            item.refused += result.refused
            item.tags = max(item.tags, result.tags)
            self.progress.notify_all()

    def _refused(self, result: ApplyResult) -> None:
        """Writes this Redis refused for good (the sink made the keys safe) go to this Redis's dead letters
        before the batch counts as applied here."""
        for r in result.refusals:
            self.metrics.redis_refused.labels(r.reason).inc()
            log.error("redis_refused", target=self.name, key=r.key, kind=r.kind, reason=r.reason, error=r.error,
                      version=r.version, detail="the key was made safe (tombstoned or reset) and the stream goes "
                                                "on; see the dead letter")
            self.dead_letters.send(Rejected(reason=f"redis_refused:{r.reason}: {r.error}", position=str(r.version),
                                            origin=f"redis:{r.kind}", key=r.key))
            self.metrics.dead_letters.inc()

    # ------------------------------------------------------------------ idle: watermark and heartbeat

    def _watermark(self) -> int:
        """Every transaction committed at or before it is applied here: this target's own applied position,
        or the source's watermark (at most what every target acknowledged, or the server's WAL end once
        everything handed out was applied everywhere)."""
        return max(self.applied_position, self.source_watermark)

    def _idle_due(self) -> bool:
        if time.monotonic() < self._idle_retry_at:
            return False
        if self.has_watermark and self._watermark() > self._announced:
            return True
        return bool(self.heartbeat) and time.monotonic() - self._last_publish >= self.heartbeat

    def _idle(self) -> None:
        """Nothing to apply: announce a watermark that moved, else the heartbeat (each numbered in this
        target's own sequence; a number spent on a failed send reads as a gap: the safe direction)."""
        self._last_publish = time.monotonic()
        try:
            w = self._watermark()
            if self.has_watermark and w > self._announced:
                self.sequencer.watermark = str(w)
                self.sink.announce_watermark(self.applied_version)
                self._announced = w
            elif self.heartbeat and self.sink.idle_heartbeat(self.applied_version):
                self.metrics.redis_restores.inc()
                log.warning("redis_restored", target=self.name, detail="registry and table counters restored")
        except REDIS_ERRORS as exc:
            self._down(str(exc))
            self._idle_retry_at = time.monotonic() + retry_delay(self.backoff, 3)
            log.debug("idle_publish_failed", target=self.name, error=str(exc))

    # ------------------------------------------------------------------ state

    def _up(self) -> None:
        if not self.connected:
            self.connected = True
            self.metrics.target_connected.labels(self.name).set(1)

    def _down(self, error: str) -> None:
        self.last_error = error
        if self.connected:
            self.connected = False
        self.metrics.target_connected.labels(self.name).set(0)
