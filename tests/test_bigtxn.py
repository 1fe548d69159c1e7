"""Huge transactions in bounded memory, and TRUNCATE ordering (issue 15, item 5 and item 7's last bullet).

Real Postgres and Redis. A transaction past ``source.max_transaction_changes`` is not buffered row by row:
it degrades to a table-wide invalidation at its commit version. A write older than its table's last
TRUNCATE (a replay, another partition) never becomes a valid value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import redis

from cdcd.backplane import Sequencer
from cdcd.change import Change, Op, Transaction
from cdcd.client import Cache, CacheOptions
from cdcd.keyspace import Keyspace
from cdcd.sinks.redis import RedisSink
from cdcd.sources.postgres import PostgresSource
from tests.helpers import DaemonThread, entry, make_config, wait_until

CAP = 50


def table_tag_key(prefix: str) -> str:
    return Keyspace(prefix).tag(Keyspace.table_tag("public.users"))


def _users(sql: Any, ids: range, name: str = "old") -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@x', %s, 1 "
        "FROM generate_series(%s::int, %s::int) i", (name, ids.start, ids.stop - 1))


def _cache(cfg: dict[str, Any]) -> Cache:
    return Cache(cfg["redis"]["url"], CacheOptions(prefix=cfg["keyspace"]["prefix"], subscribe=False))


def test_degraded_transaction_invalidates_the_table(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                    app_db: str) -> None:
    p = cfg["keyspace"]["prefix"]
    cfg["source"]["max_transaction_changes"] = CAP
    d = DaemonThread(make_config(cfg)).start()
    m = d.daemon.metrics
    try:
        _users(sql, range(1, 21))  # 20 rows: under the cap, applied row by row
        wait_until(lambda: all(entry(r, f"{p}user:{i}").get("d") for i in range(1, 21)), what="small txn")
        with _cache(cfg) as c:
            assert c.get("user:5")["name"] == "old"  # valid before
            # an app-filled entry derived from the table through a tag (tenant:{tenant_id}): the degraded
            # transaction bumps no row tags, only the table tag, which the fill recorded via the registry
            assert c.get_or_load("tenant-names:1", lambda: ["old"], tags=["tenant:1"]) == ["old"]
            assert c.get("tenant-names:1") == ["old"]
        assert "#table:public.users" in entry(r, f"{p}tenant-names:1")["t"]
        tag = table_tag_key(p)
        tag_before = int(r.get(tag) or b"0")

        with psycopg.connect(app_db) as conn:  # one transaction: 80 inserts + 100 updates > CAP
            conn.execute("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@x', 'old', 1 "
                         "FROM generate_series(21, 100) i")
            conn.execute("UPDATE users SET name = 'new'")
        wait_until(lambda: m.degraded_transactions._value.get() == 1, what="degraded metric")
        assert m.degraded_changes._value.get() == 180
        assert int(r.get(tag) or b"0") > tag_before  # the table tag moved
        floor = r.hget(Keyspace(p).floors, "public.users")
        assert floor is not None and int(floor) == d.daemon.last_version

        with _cache(cfg) as c:
            assert c.get("tenant-names:1") is None
            for i in range(1, 101):  # nothing stale, nothing from the big txn written as a value
                got = c.get(f"user:{i}")
                assert got is None, (i, got)
                assert c.get(f"user:email:u{i}@x") is None

        # a later small transaction applies normally
        sql("UPDATE users SET name = 'later' WHERE id = 3")
        wait_until(lambda: b"later" in (r.hget(f"{p}user:3", "d") or b""), what="small txn after degrade")
        with _cache(cfg) as c:
            assert c.get("user:3")["name"] == "later"
            assert c.get("user:email:u3@x")["name"] == "later"
        assert m.degraded_transactions._value.get() == 1
    finally:
        d.stop()


def test_rolled_back_big_transaction_changes_nothing(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                     app_db: str) -> None:
    p = cfg["keyspace"]["prefix"]
    cfg["source"]["max_transaction_changes"] = CAP
    d = DaemonThread(make_config(cfg)).start()
    m = d.daemon.metrics
    try:
        _users(sql, range(1, 3))
        wait_until(lambda: entry(r, f"{p}user:2").get("d"), what="seed")
        tag = r.get(table_tag_key(p))
        with psycopg.connect(app_db) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@x', 'ghost', 1 "
                         "FROM generate_series(3, 500) i")
            conn.execute("UPDATE users SET name = 'ghost' WHERE id = 1")
            conn.rollback()
        sql("UPDATE users SET name = 'marker' WHERE id = 2")  # committed after the rollback
        wait_until(lambda: b"marker" in (r.hget(f"{p}user:2", "d") or b""), what="marker")
        assert m.degraded_transactions._value.get() == 0
        assert r.get(table_tag_key(p)) == tag
        assert r.hget(Keyspace(p).floors, "public.users") is None
        with _cache(cfg) as c:
            assert c.get("user:1")["name"] == "old"
            for i in range(3, 500, 37):
                assert not r.exists(f"{p}user:{i}")
    finally:
        d.stop()


def test_transaction_buffer_is_bounded(cfg: dict[str, Any], sql: Any, app_db: str) -> None:
    """The decoder never holds more than the cap, whatever the transaction size (counted, not RSS)."""
    config = make_config({**cfg, "source": {**cfg["source"], "max_transaction_changes": 100}})
    src = PostgresSource(config.source, config.rules().source)  # type: ignore[arg-type]
    src.connect()
    try:
        peak = 0
        decoder = src._decoder
        feed = decoder.feed

        def counting_feed(payload: bytes, lsn: int = 0) -> Any:
            nonlocal peak
            out = feed(payload, lsn)
            peak = max(peak, len(decoder._txn.changes) if decoder._txn is not None else 0)
            return out

        decoder.feed = counting_feed  # type: ignore[method-assign]
        _users(sql, range(1, 5001))
        got: list[Any] = []

        def poll() -> list[Any]:
            got.extend(src.poll(0.2))
            return got

        wait_until(poll, timeout=30, what="the big transaction")
        (txn,) = got
        assert isinstance(txn, Transaction)
        assert peak <= 100, peak
        assert txn.changes == [] and txn.touched == {("public", "users"): 5000}
    finally:
        src.close()


def _sink(cfg: dict[str, Any], r: redis.Redis, packed: bool = True) -> RedisSink:
    rules = make_config(cfg).rules()
    sink = RedisSink(r, rules, Sequencer("cdcd"), "test")
    sink.packed = packed
    sink.prepare()
    return sink


def _txn(version: int, *changes: Change) -> Transaction:
    return Transaction(version=version, changes=list(changes), position=version, commit_time=datetime.now(UTC))


ROW = {"id": 7, "email": "late@x", "name": "pre-truncate", "tenant_id": 1, "updated_at": "2026-01-01T00:00:00+00:00"}


def _truncate_then_late_insert(cfg: dict[str, Any], r: redis.Redis, packed: bool, restart: bool) -> None:
    p = cfg["keyspace"]["prefix"]
    sink = _sink(cfg, r, packed)
    sink.apply(sink.rules.plan([_txn(200, Change(Op.TRUNCATE, "public", "users"))]))
    if restart:  # the late insert comes from a daemon started after the truncate (a replay)
        sink = _sink(cfg, r, packed)
    res = sink.apply(sink.rules.plan([_txn(100, Change(Op.INSERT, "public", "users", None, dict(ROW)))]))
    for key in ("user:7", "user:email:late@x"):
        with _cache(cfg) as c:
            assert c.get(key) is None, key  # main: the pre-truncate row is served as valid
        assert "d" not in entry(r, p + key), key
    assert res.floored == 2  # user:7 and user:email:late@x
    # an insert after the truncate is a value as usual
    res = sink.apply(sink.rules.plan([_txn(300, Change(Op.INSERT, "public", "users", None,
                                                       {**ROW, "name": "post"}))]))
    with _cache(cfg) as c:
        assert c.get("user:7")["name"] == "post"
    # a replayed older truncate never lowers the floor
    sink.apply(sink.rules.plan([_txn(150, Change(Op.TRUNCATE, "public", "users"))]))
    assert int(r.hget(Keyspace(p).floors, "public.users") or 0) == 200


def test_truncate_not_overtaken_by_older_insert(cfg: dict[str, Any], r: redis.Redis) -> None:
    _truncate_then_late_insert(cfg, r, packed=True, restart=False)


def test_truncate_not_overtaken_after_restart_pipeline_path(cfg: dict[str, Any], r: redis.Redis) -> None:
    _truncate_then_late_insert(cfg, r, packed=False, restart=True)


def test_truncate_floor_survives_redis_restart(cfg: dict[str, Any], private_redis: Any) -> None:
    """Redis restarted empty: the sink restores the floors it knows with the scripts and table epochs."""
    cfg["redis"]["url"] = private_redis.url
    r = redis.Redis.from_url(private_redis.url)
    sink = _sink(cfg, r)
    sink.apply(sink.rules.plan([_txn(200, Change(Op.TRUNCATE, "public", "users"))]))
    r.flushall()
    r.script_flush()
    sink.apply(sink.rules.plan([_txn(100, Change(Op.INSERT, "public", "users", None, dict(ROW)))]))
    with _cache(cfg) as c:
        assert c.get("user:7") is None
    assert int(r.hget(Keyspace(cfg['keyspace']['prefix']).floors, "public.users") or 0) == 200
