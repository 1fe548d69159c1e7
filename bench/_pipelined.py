"""PROTOTYPE, for measurement only: the daemon loop with Redis work overlapped with decoding/planning.

``cdcd run`` handles one batch at a time: poll -> plan -> send to Redis -> *wait* -> ack. While Redis
executes a batch the daemon idles, and while the daemon decodes the next one Redis idles; the drain
benchmark shows daemon CPU + Redis CPU ~= wall time. Here the loop sends batch k
(:meth:`cdcd.sinks.redis.RedisSink.begin`), polls and plans batch k+1 while Redis works, and only
then reads k's replies and acknowledges k. Invariants kept: k is acknowledged only after Redis
answered for all of it; batches reach Redis in order on one connection (so backplane messages stay
ordered); a failed ``wait`` re-applies k synchronously with the daemon's usual retry loop.

Run as ``python bench/_pipelined.py --config FILE`` (a stand-in for ``cdcd run``). This subclasses the
daemon and copies the bookkeeping of ``Daemon._process``; the real change belongs in cdcd/daemon.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import structlog

from cdcd.change import Rejected, Transaction
from cdcd.config import load_config
from cdcd.daemon import Daemon
from cdcd.logs import configure
from cdcd.rules import Batch
from cdcd.sinks.redis import ApplyResult, PendingApply

log = structlog.get_logger("cdcd.daemon")


class _OverlappingSource:
    """Wraps the source: while a batch is in flight, an empty non-blocking poll finishes it first."""

    def __init__(self, daemon: PipelinedDaemon, source: Any) -> None:
        self._daemon = daemon
        self._source = source

    def poll(self, timeout: float) -> Any:
        if self._daemon.pending is not None:
            items = self._source.poll(0)
            if items:
                return items
            self._daemon.finish_pending()
        return self._source.poll(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


class PipelinedDaemon(Daemon):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: tuple[Any, Batch, PendingApply | None] | None = None
        self.source = _OverlappingSource(self, self.source)

    def _process(self, items: Any) -> None:
        m = self.metrics
        txns: list[Transaction] = []
        for item in items:
            if isinstance(item, Rejected):
                self._dead_letter(item)
            else:
                txns.append(item)
        batch = self.rules.plan(txns)  # overlaps with Redis executing the previous batch
        for p in batch.problems:
            m.problems.labels(p.kind, p.relation).inc()
            log.warning(p.kind, table=p.relation, detail=p.detail, position=str(p.position))
        self.finish_pending()
        try:
            handle: PendingApply | None = self.sink.begin(batch)
        except redis.RedisError:
            handle = None  # finish_pending applies it synchronously with retries
        self.pending = (items, batch, handle)

    def finish_pending(self) -> None:
        if self.pending is None:
            return
        items, batch, handle = self.pending
        self.pending = None
        result: ApplyResult
        try:
            if handle is None:
                raise redis.RedisError("not sent")
            result = handle.wait()
        except redis.RedisError:
            result = self._retry_redis("apply", lambda: self.sink.apply(batch))
        self.source.ack([it.position for it in items])
        self._account(items, batch, result)

    def _account(self, items: Any, batch: Batch, result: ApplyResult) -> None:
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
        m.writes.labels("tombstone").inc(result.tombstones)
        m.writes.labels("value").inc(result.values)
        m.stale_writes.inc(result.refused)
        m.tag_bumps.inc(result.tags)
        m.backplane.inc(result.messages)
        m.redis_rtt.observe(result.rtt)
        if batch.commit_ts:
            m.commit_to_apply.observe(max(0.0, now - batch.commit_ts))
        if batch.version:
            m.version.set(batch.version)
        log.info("batch", txns=batch.transactions, changes=sum(batch.counts.values()), writes=len(batch.writes),
                 refused=result.refused, tags=result.tags, version=batch.version,
                 redis_ms=round(result.rtt * 1000, 2),
                 lag_ms=round((now - batch.oldest_commit_ts) * 1000, 1) if batch.oldest_commit_ts else None)
        if self.on_batch is not None:
            self.on_batch(batch, result)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    config = load_config(args.config)
    configure(config.log.format, config.log.level)
    daemon = PipelinedDaemon(config)
    daemon.install_signal_handlers()
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
