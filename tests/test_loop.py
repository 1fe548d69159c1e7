"""The overlapped daemon loop (cdcd/daemon.py): batch N+1 is planned while Redis executes N, yet N is
applied before anything newer is sent, acknowledged only after its replies were read, and settled on
stop. Real Postgres and Redis; the sink and source are wrapped only to record (and once, to cut the
sink's connection between sending and reading, as a Redis dying mid-reply would)."""

from __future__ import annotations

from typing import Any

import psycopg
import redis

from cdcd.batchlog import BatchLog
from cdcd.rules import Batch
from cdcd.sinks.redis import ApplyResult, PendingApply
from tests.helpers import DaemonThread, db_users, entry, make_config, stale_users, wait_until


def _confirmed_flush(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
                           "WHERE slot_name = %s", (slot,)).fetchone()
    assert row is not None
    return int(row[0])


def _insert_users(dsn: str, first: int, n: int) -> None:
    """One transaction per user: many small transactions, so a small ``max_batch`` makes many batches."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(first, first + n):
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, 1)",
                         (i, f"u{i}@x", f"n{i}"))


class Recorder:
    """Wraps a daemon's sink and source; records begin / wait / apply / ack in the order they happen."""

    def __init__(self, d: DaemonThread, cut_wait_of: int | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.ids: dict[int, int] = {}  # id(batch) -> sequence number
        self.batches: list[Batch] = []  # kept alive, so no id() is reused
        self.cut_wait_of = cut_wait_of
        self.cut_done = False
        sink, source = d.daemon.sink, d.daemon.source
        begin, apply, ack, poll = sink.begin, sink.apply, source.ack, source.poll

        def seq(batch: Batch) -> int:
            if id(batch) not in self.ids:
                self.batches.append(batch)
                self.ids[id(batch)] = len(self.ids)
            return self.ids[id(batch)]

        def wrapped_begin(batch: Batch) -> PendingApply:
            n = seq(batch)
            pending = begin(batch)
            self.events.append(("begin", n))
            wait = pending.wait

            def wrapped_wait() -> ApplyResult:
                if n == self.cut_wait_of and not self.cut_done:
                    self.cut_done = True
                    pending.conn.disconnect()  # the replies are lost: as if Redis died mid-reply
                try:
                    result = wait()
                except BaseException:
                    self.events.append(("wait_failed", n))
                    raise
                self.events.append(("waited", n))
                return result

            pending.wait = wrapped_wait  # type: ignore[method-assign]
            return pending

        def wrapped_apply(batch: Batch) -> ApplyResult:
            result = apply(batch)
            self.events.append(("applied", seq(batch)))
            return result

        def wrapped_ack(positions: Any) -> None:
            ack(positions)
            self.events.append(("ack", max((p for p in positions if isinstance(p, int)), default=-1)))

        def wrapped_poll(timeout: float) -> Any:
            items = poll(timeout)
            if items:
                self.events.append(("polled", len(items)))
            return items

        sink.begin = wrapped_begin  # type: ignore[method-assign]
        source.poll = wrapped_poll  # type: ignore[method-assign]
        sink.apply = wrapped_apply  # type: ignore[method-assign]
        source.ack = wrapped_ack  # type: ignore[method-assign]


def _check_order(events: list[tuple[str, int]]) -> None:
    """Each batch is sent only after the one before was settled (replies read or applied again), and every
    ack follows its batch's success; acknowledged positions only grow."""
    settled: set[int] = set()
    sent: list[int] = []
    last_ack = -1
    done_since_ack: int | None = None
    for kind, n in events:
        if kind == "begin":
            assert not sent or sent[-1] in settled, f"batch {n} sent before batch {sent[-1]} was applied: {events}"
            sent.append(n)
        elif kind in ("waited", "applied"):
            settled.add(n)
            done_since_ack = n
        elif kind == "ack":
            assert done_since_ack is not None, f"an ack without an applied batch before it: {events}"
            done_since_ack = None
            assert n >= last_ack, f"acks went backwards: {events}"
            last_ack = n


def test_overlapped_loop_keeps_order_and_acks_only_applied_batches(cfg: dict[str, Any], r: redis.Redis,
                                                                    app_db: str) -> None:
    """Many batches (max_batch 5) drained from a filled slot: sends and acks interleave as documented."""
    cfg = {**cfg, "source": {**cfg["source"], "max_batch": 5}}
    d = DaemonThread(make_config(cfg)).start()
    d.stop()  # the slot exists now: fill it while nobody reads
    _insert_users(app_db, 1, 120)
    d = DaemonThread(make_config(cfg))
    rec = Recorder(d)
    d.start()
    try:
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(r, cfg["keyspace"]["prefix"], expected), timeout=30,
                   what="all 120 users applied")
    finally:
        d.stop()
    begins = [n for k, n in rec.events if k == "begin"]
    assert len(begins) >= 20, rec.events  # 120 one-row transactions, 5 changes per batch at most
    _check_order(rec.events)
    assert d.daemon.applied_batches == len(begins)
    assert [n for k, n in rec.events if k == "waited"] == begins  # every batch settled by reading its replies
    # the point of the loop: the next batch was read (and planned) while one was in flight
    overlapped = [n for i, (k, n) in enumerate(rec.events) if k == "begin"
                  and i + 1 < len(rec.events) and rec.events[i + 1][0] == "polled"]
    assert overlapped, rec.events


def test_replies_lost_mid_flight_batch_applied_again_before_the_next_is_sent(
        cfg: dict[str, Any], r: redis.Redis, app_db: str) -> None:
    cfg = {**cfg, "source": {**cfg["source"], "max_batch": 5}}
    d = DaemonThread(make_config(cfg)).start()
    d.stop()
    _insert_users(app_db, 1, 60)
    d = DaemonThread(make_config(cfg))
    rec = Recorder(d, cut_wait_of=3)
    d.start()
    try:
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(r, cfg["keyspace"]["prefix"], expected), timeout=30,
                   what="all 60 users applied after the lost replies")
    finally:
        d.stop()
    ev = rec.events
    assert rec.cut_done
    i = ev.index(("wait_failed", 3))
    # the very next Redis event is batch 3 applied again, then its ack, and only then batch 4 is sent
    after = [e for e in ev[i + 1:] if e[0] != "ack"]
    assert after[0] == ("applied", 3), ev
    assert after[1] == ("begin", 4), ev
    assert [k for k, _ in ev[i + 1:i + 3]] == ["applied", "ack"], ev
    _check_order(ev)
    assert d.daemon.metrics.retries.labels("redis")._value.get() >= 1


def test_stop_settles_the_batch_in_flight(cfg: dict[str, Any], r: redis.Redis, app_db: str) -> None:
    """stop() while a batch is in flight: the loop ends only after its replies were read and it was acked,
    and the ack reached the slot (confirmed_flush_lsn) before the source closed."""
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    try:
        sink = d.daemon.sink
        begin = sink.begin
        stopped_with: list[int] = []

        def begin_then_stop(batch: Batch) -> PendingApply:
            pending = begin(batch)
            if batch.writes and not stopped_with:
                stopped_with.append(batch.version or 0)
                d.daemon.stop()  # the loop sees it with this batch sent and its replies unread
            return pending

        sink.begin = begin_then_stop  # type: ignore[method-assign]
        before = _confirmed_flush(app_db, cfg["source"]["slot"])
        _insert_users(app_db, 1, 1)
        d.thread.join(15)
        assert not d.thread.is_alive()
    finally:
        d.stop()
    assert d.error is None
    assert stopped_with
    assert entry(r, f"{p}user:1").get("d"), "the batch in flight was applied"
    assert d.daemon.applied_batches >= 1 and d.daemon.last_version == stopped_with[0]
    assert d.daemon.metrics.position._value.get() > before, "cdcd_source_position set by the settled batch"
    wait_until(lambda: _confirmed_flush(app_db, cfg["source"]["slot"]) > before,
               what="the settled batch acked to the slot")


def test_batch_log_summarises_at_the_interval() -> None:
    lines: list[dict[str, Any]] = []
    bl = BatchLog(lambda event, **kw: lines.append({"event": event, **kw}), interval=3600)
    bl.add(1, 10, 12, 0, 2, 100, 0.002, 5.0)
    assert len(lines) == 1 and lines[0]["batches"] == 1 and lines[0]["changes"] == 10  # the first at once
    bl.add(2, 20, 24, 1, 3, 200, 0.004, 9.0)
    bl.add(1, 5, 6, 0, 1, None, 0.001, None)
    bl.idle()
    assert len(lines) == 1  # within the interval: summed, not written
    bl.flush()
    assert len(lines) == 2
    line = lines[1]
    assert (line["batches"], line["txns"], line["changes"], line["writes"], line["refused"], line["tags"]) == (
        2, 3, 25, 30, 1, 4)
    assert line["version"] == 200 and line["lag_ms"] == 9.0
    assert line["redis_ms"] == 2.5 and line["redis_ms_max"] == 4.0
    assert line["last_at"].endswith("Z")
    bl.flush()
    assert len(lines) == 2  # nothing pending: nothing written
    every = BatchLog(lambda event, **kw: lines.append(kw), interval=0)
    every.add(1, 1, 1, 0, 0, 1, 0.0, None)
    every.add(1, 1, 1, 0, 0, 2, 0.0, None)
    assert len(lines) == 4  # interval 0: one line per batch
