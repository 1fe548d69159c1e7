"""One stream, several Redis targets (docs/multi-target.md), against real Postgres and two real Redis servers.

A target killed mid-stream does not stop the other; it catches up from where it stopped; both end equal
to the database; the slot's confirmed position never passes what the slower target applied; a daemon
restart while a target is down replays to everyone; a full backlog stops reading instead of dropping.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from cdcd.cli import format_status
from cdcd.devservers import RedisServer
from cdcd.multitarget import MultiTargetDaemon
from tests.helpers import DaemonThread, db_users, entry, make_config, stale_users, wait_until


@pytest.fixture
def two_redis() -> Iterator[tuple[RedisServer, RedisServer]]:
    a, b = RedisServer(), RedisServer()
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def _targets_cfg(cfg: dict[str, Any], a: RedisServer, b: RedisServer, **b_extra: Any) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k != "redis"}
    conn = {"socket_timeout": 1.0, "connect_timeout": 0.5}
    out["targets"] = {"a": {"url": a.url, **conn}, "b": {"url": b.url, **conn, **b_extra}}
    return out




def _cached_names(r: redis.Redis, prefix: str, ids: range) -> dict[int, str]:
    out = {}
    for uid in ids:
        d = entry(r, f"{prefix}user:{uid}").get("d")
        if d is not None:
            out[uid] = json.loads(d)["name"]
    return out


class Writer(threading.Thread):
    """Inserts users ``first..first+n-1`` one per transaction, then renames each."""

    def __init__(self, dsn: str, first: int, n: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.dsn, self.first, self.n, self.pause = dsn, first, n, pause
        self.committed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ids = range(self.first, self.first + self.n)
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for i in ids:
                    conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, %s)",
                                 (i, f"u{i}@x", f"n{i}", i % 5))
                    self.committed += 1
                    time.sleep(self.pause)
                for i in ids:
                    conn.execute("UPDATE users SET name = %s, email = %s WHERE id = %s", (f"r{i}", f"w{i}@x", i))
                    self.committed += 1
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc


# Commit records in [applied, confirmed) of transactions that changed a published table: each is a change the
# slot confirmed while a target had not applied it (a restart would skip it). psycopg2 forwards the flush
# position to a keepalive's WAL end by itself once everything it read was acknowledged, so the slot may pass
# the applied position over WAL that holds no such commit (other tables, vacuum, the end of a record): that is
# not a loss, and only WAL itself can tell the two apart.
_LOST_COMMITS = """
WITH r AS (SELECT * FROM pg_get_wal_records_info('0/0'::pg_lsn + %(lo)s::numeric, '0/0'::pg_lsn + %(hi)s::numeric)),
     rel AS (SELECT '/' || pg_relation_filenode(format('%%I.%%I', schemaname, tablename)::regclass) || ' ' AS part
             FROM pg_publication_tables WHERE pubname = %(pub)s)
SELECT count(*) FROM r c
WHERE c.resource_manager = 'Transaction' AND c.record_type LIKE 'COMMIT%%'
  AND c.start_lsn >= '0/0'::pg_lsn + %(applied)s::numeric
  AND EXISTS (SELECT 1 FROM r h, rel WHERE h.xid = c.xid AND h.resource_manager LIKE 'Heap%%'
                                       AND position(rel.part IN h.block_ref) > 0)
"""


class SlotWatch(threading.Thread):
    """Polls the slot's confirmed_flush_lsn and, right after, every target's applied position (read in that
    order, a pass is a real one). A pass is a violation when the WAL between the slowest target's position
    and the confirmed one holds the commit of a transaction that changed a published table (pg_walinspect)."""

    def __init__(self, dsn: str, slot: str, daemon: MultiTargetDaemon, publication: str | None = None) -> None:
        super().__init__(daemon=True)
        self.dsn, self.slot, self.daemon = dsn, slot, daemon
        self.publication = publication or slot
        self.samples = 0
        self.passes = 0  # confirmed ahead of the slowest target over WAL with no change of ours (not a loss)
        self.violations: list[tuple[int, dict[str, int]]] = []
        self.start_lsn: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            while not self.done.wait(0.02):
                row = conn.execute("SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint "
                                   "FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
                if row is None or row[0] is None:
                    continue
                confirmed = int(row[0])
                applied = {t.name: t.applied_position for t in self.daemon.targets}
                if self.start_lsn is None:
                    self.start_lsn = confirmed  # where the slot was created: before anything was applied
                slowest = max(self.start_lsn, min(applied.values()))
                if confirmed > slowest:
                    lost = conn.execute(_LOST_COMMITS, {"lo": max(self.start_lsn, slowest - 65536), "hi": confirmed,
                                                        "applied": slowest, "pub": self.publication}).fetchone()
                    if lost is not None and lost[0]:
                        self.violations.append((confirmed, applied))
                    else:
                        self.passes += 1
                self.samples += 1


def _multi(d: DaemonThread) -> MultiTargetDaemon:
    assert isinstance(d.daemon, MultiTargetDaemon)
    return d.daemon


@pytest.mark.slow
def test_target_killed_mid_stream_others_go_on_and_both_converge(
        cfg: dict[str, Any], app_db: str, two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, b = two_redis
    p = cfg["keyspace"]["prefix"]
    ra, rb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
    d = DaemonThread(make_config(_targets_cfg(cfg, a, b))).start()
    daemon = _multi(d)
    watch = SlotWatch(app_db, cfg["source"]["slot"], daemon)
    watch.start()
    writer = Writer(app_db, 1, 150, pause=0.005)
    try:
        writer.start()
        wait_until(lambda: daemon.targets[1].applied_position > 0, what="target b applied something")
        b.stop()  # SIGKILL: b is gone with everything it held
        # b's own thread failed (not only the monitor's ping): from now on it cannot apply anything
        wait_until(lambda: daemon.metrics.retries.labels("redis:b")._value.get() > 0, timeout=5,
                   what="target b's thread noticed it down")
        b_at_kill = daemon.targets[1].applied_position
        a_at_kill = daemon.targets[0].applied_position
        names_at_kill = _cached_names(ra, p, range(1, 151))
        time.sleep(1.5)
        # the healthy target kept being applied: its position moved and its entries changed meanwhile
        assert daemon.targets[0].applied_position > a_at_kill
        assert _cached_names(ra, p, range(1, 151)) != names_at_kill
        ready, reasons = daemon.readiness()
        assert not ready and any(r.startswith("target b: redis unavailable") for r in reasons), reasons
        assert daemon.status()["slowest_target"] == "b"
        assert "target b" in format_status(daemon.status()) and "DOWN" in format_status(daemon.status())
        # read-your-writes on a does not wait for b: a's watermark passes a commit made while b is down,
        # though the slot's checkpoint is held back at b's position
        with psycopg.connect(app_db) as conn:  # the insert position inside the transaction: before its commit
            conn.execute("UPDATE users SET tenant_id = tenant_id WHERE id = 1")
            during = int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint")
                         .fetchone()[0])
            conn.commit()
        wait_until(lambda: int(ra.hget(f"{p}#cdcd:applied", "watermark") or 0) >= during, timeout=10,
                   what="a's watermark to pass a commit made while b is down")
        assert daemon.targets[1].applied_position == b_at_kill  # nothing applied to a dead server
        b.start()  # back, empty
        writer.join(60)
        assert writer.error is None
        expected = db_users(app_db)
        for name, r in (("a", ra), ("b", rb)):
            wait_until(lambda r=r: not stale_users(r, p, expected), timeout=30, interval=0.2,
                       what=f"every cached user on target {name} to equal the database")
        wait_until(lambda: daemon.readiness()[0], timeout=10, what="ready again once b caught up")
    finally:
        watch.done.set()
        watch.join(5)
        d.stop()
    assert d.error is None
    assert watch.samples > 20
    assert not watch.violations, watch.violations[:5]
    # each target's applied state holds its own watermark and backplane sequence (the daemon's run id)
    wa, wb = (int(x.hget(f"{p}#cdcd:applied", "watermark") or 0) for x in (ra, rb))
    assert wa > 0 and wb > 0
    assert ra.hget(f"{p}#cdcd:applied", "run") == rb.hget(f"{p}#cdcd:applied", "run") == daemon.sequencer.run.encode()
    assert all(int(x.hget(f"{p}#cdcd:applied", "seq") or 0) > 0 for x in (ra, rb))


@pytest.mark.slow
def test_daemon_restart_while_a_target_is_down_replays_to_it_and_backpressure_holds_the_rest(
        cfg: dict[str, Any], app_db: str, sql: Any, two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, b = two_redis
    p = cfg["keyspace"]["prefix"]
    slot = cfg["source"]["slot"]
    ra, rb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)

    def confirmed() -> int:
        return int(sql("SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
                       "WHERE slot_name = %s", (slot,)).fetchone()[0])

    first = DaemonThread(make_config(_targets_cfg(cfg, a, b))).start()
    w = Writer(app_db, 1, 20)
    w.start()
    w.join(30)
    wait_until(lambda: not stale_users(ra, p, db_users(app_db)) and not stale_users(rb, p, db_users(app_db)),
               timeout=15,
               what="both targets hold the first users")
    b.pause()  # down but keeping what it holds: it must catch up from exactly where it stopped
    w = Writer(app_db, 21, 20)
    w.start()
    w.join(30)
    wait_until(lambda: not stale_users(ra, p, db_users(app_db)), timeout=15,
               what="a applied the writes made while b was down")
    first.stop()  # b still down: its backlog is not acknowledged
    b_applied = _multi(first).targets[1].applied_position
    assert 0 < b_applied < _multi(first).targets[0].applied_position
    assert confirmed() <= b_applied, "the slot passed what the down target applied"

    # a new daemon, b still down and a small backlog bound for it: replays from the checkpoint to both
    second = DaemonThread(make_config(_targets_cfg(cfg, a, b, max_pending_changes=30))).start()
    daemon = _multi(second)
    try:
        w = Writer(app_db, 41, 40)  # 80 changes: more than b's bound
        w.start()
        w.join(30)
        wait_until(lambda: daemon.metrics.backpressure.labels("b")._value.get() == 1, timeout=15,
                   what="backpressure on b's full backlog")
        assert daemon.targets[1].pending_changes < 30 + 500  # the bound, plus at most one source batch
        assert any("target b: backlog full" in r for r in daemon.readiness()[1])
        assert confirmed() <= b_applied
        # the replay from the checkpoint (b's position) repeated to a what a already held: refused as not newer
        assert daemon.metrics.stale_writes._value.get() > 0
        b.resume()
        expected = db_users(app_db)
        for name, r in (("a", ra), ("b", rb)):
            wait_until(lambda r=r: not stale_users(r, p, expected), timeout=30, interval=0.2,
                       what=f"every cached user on target {name} to equal the database")
        wait_until(lambda: daemon.metrics.backpressure.labels("b")._value.get() == 0, timeout=10,
                   what="backpressure released")
        assert daemon.metrics.backpressure_events.labels("b")._value.get() >= 1
        wait_until(lambda: confirmed() > b_applied, timeout=10, what="the slot moves again once b caught up")
    finally:
        second.stop()
    assert second.error is None and first.error is None


def test_dropped_slot_invalidates_every_target(cfg: dict[str, Any], sql: Any,
                                               two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, b = two_redis
    p = cfg["keyspace"]["prefix"]
    clients = [redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)]
    data = _targets_cfg(cfg, a, b)
    d = DaemonThread(make_config(data)).start()
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
    for r in clients:
        wait_until(lambda r=r: entry(r, f"{p}user:1").get("d"), what="applied to both targets")
    d.stop()
    epochs = [int(r.get(f"{p}#tag:#table:public.users") or 0) for r in clients]
    sql("SELECT pg_drop_replication_slot(%s)", (cfg["source"]["slot"],))
    sql("UPDATE users SET name = 'changed while no slot existed' WHERE id = 1")  # lost for good
    d = DaemonThread(make_config(data)).start()
    try:
        # through each target's backlog, before anything newer: every table tag bumped on every target
        for r, epoch in zip(clients, epochs, strict=True):
            wait_until(lambda r=r, epoch=epoch: int(r.get(f"{p}#tag:#table:public.users") or 0) > epoch,
                       what="the table tag bumped on every target")
            wait_until(lambda r=r: r.hget(f"{p}#cdcd:applied", "source") == b"", what="the applied source forgotten")
        assert d.daemon.metrics.errors.labels("slot_lost")._value.get() == 2  # counted per target
        sql("UPDATE users SET name = 'after' WHERE id = 1")  # and it streams again, to both
        for r in clients:
            wait_until(lambda r=r: json.loads(entry(r, f"{p}user:1").get("d", "{}")).get("name") == "after",
                       what="resumed")
    finally:
        d.stop()


def test_rejected_record_is_dead_lettered_on_every_target_without_waiting_for_a_down_one(
        cfg: dict[str, Any], sql: Any, two_redis: tuple[RedisServer, RedisServer]) -> None:
    a, b = two_redis
    p = cfg["keyspace"]["prefix"]
    ra, rb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
    d = DaemonThread(make_config(_targets_cfg(cfg, a, b))).start()
    try:
        b.stop()
        sql("SELECT pg_logical_emit_message(true, 'cdcd', 'not json')")
        sql("INSERT INTO orders VALUES (79, 1, 7, 1.00, 'new')")
        wait_until(lambda: entry(ra, f"{p}order:79"), what="a applied the order while b is down")
        dlq = ra.xrange(f"{p}#cdcd:dlq")
        assert len(dlq) == 1 and b"malformed cdcd message" in dlq[0][1][b"reason"]
        b.start()  # back empty: its backlog still holds the rejected record and the order, in that order
        wait_until(lambda: entry(rb, f"{p}order:79"), timeout=15, what="b applied the order once back")
        dlq = rb.xrange(f"{p}#cdcd:dlq")
        assert len(dlq) == 1 and b"malformed cdcd message" in dlq[0][1][b"reason"]
        assert d.daemon.metrics.errors.labels("rejected")._value.get() == 1  # rejected once, recorded per target
        assert d.daemon.metrics.dead_letters._value.get() == 2
    finally:
        d.stop()


def test_catch_up_is_pipelined_and_replies_lost_mid_pipeline_lose_nothing(
        cfg: dict[str, Any], app_db: str, two_redis: tuple[RedisServer, RedisServer]) -> None:
    """A target back from an outage sends its backlog back to back (not one round trip per batch); when the
    replies are cut in the middle, the batch whose replies were lost is applied again, alone, before the rest."""
    a, b = two_redis
    p = cfg["keyspace"]["prefix"]
    cfg = {**cfg, "source": {**cfg["source"], "max_batch": 5}}  # many small batches
    rb = redis.Redis.from_url(b.url)
    d = DaemonThread(make_config(_targets_cfg(cfg, a, b)))
    target = _multi(d).targets[1]
    events: list[tuple[str, int]] = []
    ids: dict[int, int] = {}
    begin, apply = target.sink.begin, target.sink.apply
    cut = {"done": False}

    def n_of(batch: Any) -> int:
        return ids.setdefault(id(batch), len(ids))

    def wrapped_begin(batch: Any) -> Any:
        n = n_of(batch)
        pending = begin(batch)
        events.append(("begin", n))
        wait = pending.wait

        def wrapped_wait() -> Any:
            if len([e for e in events if e[0] == "waited"]) == 3 and not cut["done"]:
                cut["done"] = True
                pending.conn.disconnect()  # as if Redis died mid-reply, with later batches already sent
            try:
                result = wait()
            except BaseException:
                events.append(("wait_failed", n))
                raise
            events.append(("waited", n))
            return result

        pending.wait = wrapped_wait
        return pending

    def wrapped_apply(batch: Any) -> Any:
        result = apply(batch)
        events.append(("applied", n_of(batch)))
        return result

    target.sink.begin = wrapped_begin  # type: ignore[method-assign]
    target.sink.apply = wrapped_apply  # type: ignore[method-assign]
    b.stop()
    d.start()
    try:
        w = Writer(app_db, 1, 40)  # 80 one-change transactions: ~16 batches queue up for b
        w.start()
        w.join(30)
        wait_until(lambda: target.pending_changes >= 80, timeout=15, what="b's backlog holds every change")
        b.start()
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(rb, p, expected), timeout=30, interval=0.2,
                   what="every cached user on b to equal the database")
    finally:
        d.stop()
    assert cut["done"], events
    # b was down at the first start (no slot yet): not taken for a lost slot
    assert d.daemon.metrics.errors.labels("slot_lost")._value.get() == 0
    first_wait = next(i for i, e in enumerate(events) if e[0] == "waited")
    assert sum(1 for e in events[:first_wait] if e[0] == "begin") > 3, events  # sent back to back
    i = next(i for i, e in enumerate(events) if e[0] == "wait_failed")
    lost = events[i][1]
    assert events[i + 1] == ("applied", lost), events  # applied again, alone, before anything after it
    applied_order = [n for kind, n in events if kind in ("waited", "applied")]
    assert applied_order == sorted(applied_order), events  # in order, each once after the repeat
