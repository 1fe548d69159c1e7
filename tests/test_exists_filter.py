"""Existence filters (issue 14 item 1) against real Postgres, Redis and the daemon: seeded from a snapshot,
kept current by the batch path, never a false "absent" for an applied insert, rebuilt when deletes push
the false-positive rate past its bound, and safe across a daemon stopped mid-build."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import psycopg
import pytest
import redis

from cdcd.bloom import positions
from cdcd.client import AsyncCache, Cache, CacheOptions, commit_position
from cdcd.client.existence import absent
from cdcd.config import parse_config
from cdcd.devservers import RedisServer
from cdcd.keyspace import SCRIPTS, Keyspace
from cdcd.rules import Batch
from cdcd.sinks.exists import ExistsWrites
from tests.helpers import DaemonThread, make_config, unique, wait_until


def _with_filter(cfg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    users = {**cfg["tables"]["users"], "exists_filter": {"key": "user:{id}", "expected": 10_000, "fp_rate": 0.01,
                                                         **extra}}
    return {**cfg, "tables": {**cfg["tables"], "users": users}}


def _meta(r: redis.Redis, cfg: dict[str, Any]) -> dict[bytes, bytes]:
    return r.hgetall(Keyspace(cfg["keyspace"]["prefix"]).exists_filter("users")[0])  # type: ignore[return-value]


def _seeded(r: redis.Redis, cfg: dict[str, Any], generation: int = 1) -> bool:
    m = _meta(r, cfg)
    return b"a" in m and int(m.get(b"gen", b"0")) >= generation


def _insert(sql: Any, ids: range) -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@x', 'n', 1 "
        "FROM generate_series(%s::int, %s::int) i", (ids.start, ids.stop - 1))


_conns: dict[str, psycopg.Connection[Any]] = {}
_conn_lock = threading.Lock()


def _loader(dsn: str, uid: int, calls: list[int]) -> Any:
    """A database query per call (counted in ``calls``), on one connection per thread and database."""
    def load() -> Any:
        calls.append(uid)
        key = f"{dsn}/{threading.get_ident()}"
        with _conn_lock:
            conn = _conns.get(key)
            if conn is None:
                conn = _conns[key] = psycopg.connect(dsn, autocommit=True)
        row = conn.execute("SELECT id, name FROM users WHERE id = %s", (uid,)).fetchone()
        return None if row is None else {"id": row[0], "name": row[1]}
    return load


@pytest.fixture(autouse=True)
def _close_loader_connections() -> Any:
    yield
    with _conn_lock:
        for conn in _conns.values():
            conn.close()
        _conns.clear()


@pytest.mark.slow
def test_scraper_of_absent_ids_spares_the_database(cfg: dict[str, Any], redis_server: RedisServer, app_db: str,
                                                    sql: Any, r: redis.Redis) -> None:
    _insert(sql, range(1, 2001))  # before the daemon: these reach the filter through the snapshot only
    d = DaemonThread(make_config(_with_filter(cfg))).start()
    p = cfg["keyspace"]["prefix"]
    filtered = Cache(redis_server.url, CacheOptions(prefix=p))
    plain = Cache(redis_server.url, CacheOptions(prefix=p))  # negative caching alone
    try:
        wait_until(lambda: _seeded(r, cfg), 30, what="filter seeded")
        rng = random.Random(7)
        scraped = [rng.randrange(10_000, 10_000_000) for _ in range(2000)]
        with_filter: list[int] = []
        without: list[int] = []
        for uid in scraped:
            assert filtered.get_or_load(f"user:{uid}", _loader(app_db, uid, with_filter), exists_filter="users") is None
            assert plain.get_or_load(f"user:{uid}", _loader(app_db, uid, without)) is None
        assert len(without) >= 1950  # random ids rarely repeat: negative caching alone barely helps
        assert len(with_filter) <= 0.01 * len(without), (len(with_filter), len(without))
        assert filtered.stats.exists_absent == len(scraped) - len(with_filter)
        with pytest.raises(ValueError, match="is not a key of the existence filter of users"):
            filtered.get_or_load("user:email:u1@x", lambda: None, exists_filter="users")  # not what it holds
        # rows that exist are never refused by the filter: snapshot rows, and rows inserted after seeding
        _insert(sql, range(2001, 2101))
        pos = commit_position(psycopg.connect(app_db, autocommit=True))
        for uid in (*range(1, 2001, 97), *range(2001, 2101)):
            got = filtered.get_or_load(f"user:{uid}", _loader(app_db, uid, []), exists_filter="users",
                                       min_position=pos)
            assert got is not None and got["id"] == uid

        async def async_reads() -> tuple[Any, Any]:
            async with AsyncCache(redis_server.url, CacheOptions(prefix=p)) as ac:
                gone = await ac.get_or_load("user:99999999", lambda: {"id": -1}, exists_filter="users")
                there = await ac.get_or_load("user:5", lambda: {"id": 5}, exists_filter="users")
                return gone, there
        assert asyncio.run(async_reads()) == (None, {"id": 5})
    finally:
        filtered.close()
        plain.close()
        d.stop()


def test_no_false_absent_for_applied_inserts_while_generations_switch(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any, r: redis.Redis) -> None:
    """Inserters commit rows one at a time; after each commit a reader waits for its position and asks the
    filter. Meanwhile the filter is rebuilt again and again (new generation, snapshot, switch). Not one
    applied insert may read as absent."""
    _insert(sql, range(1, 501))
    d = DaemonThread(make_config(_with_filter(cfg, check_every=3600))).start()
    p = cfg["keyspace"]["prefix"]
    cache = Cache(redis_server.url, CacheOptions(prefix=p, ryw_timeout=10, ryw_on_timeout="raise"))
    keeper = d.daemon.exists_keeper
    spec = d.daemon.rules.exists["public.users"]
    false_absent: list[int] = []
    checked: list[int] = []
    stop = threading.Event()
    try:
        wait_until(lambda: _seeded(r, cfg), 30, what="filter seeded")

        def rebuild() -> None:
            while not stop.is_set():
                keeper.build("public.users", spec, "test")

        def inserter(base: int) -> None:
            with psycopg.connect(app_db, autocommit=True) as conn:
                for i in range(100):
                    uid = base + i
                    conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, 'n', 1)",
                                 (uid, f"i{uid}@x"))
                    pos = commit_position(conn)
                    assert cache.wait_applied(pos, timeout=10)
                    if absent(cache.exists, cache.link.call, cache.stats, "users", f"user:{uid}"):
                        false_absent.append(uid)
                    got = cache.get_or_load(f"user:{uid}", _loader(app_db, uid, []), exists_filter="users",
                                            min_position=pos)
                    if got is None:
                        false_absent.append(uid)
                    checked.append(uid)

        builder = threading.Thread(target=rebuild)
        builder.start()
        workers = [threading.Thread(target=inserter, args=(100_000 * (n + 1),)) for n in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        stop.set()
        builder.join(60)
        assert len(checked) == 300
        assert false_absent == []
        assert int(_meta(r, cfg)[b"gen"]) >= 3  # generations did switch during the run
    finally:
        stop.set()
        cache.close()
        d.stop()


def test_deletes_push_the_fp_rate_past_its_bound_and_a_rebuild_brings_it_back(
        cfg: dict[str, Any], redis_server: RedisServer, sql: Any, r: redis.Redis) -> None:
    d = DaemonThread(make_config(_with_filter(cfg, expected=500, rebuild_at=0.05, check_every=0.2))).start()
    try:
        wait_until(lambda: _seeded(r, cfg), 30, what="filter seeded")
        for lo in range(1, 3001, 500):  # churn: 3000 rows come and go, 6x the filter's capacity
            _insert(sql, range(lo, lo + 500))
            sql("DELETE FROM users WHERE id < %s", (lo + 500,))
        metrics = d.daemon.metrics.registry
        wait_until(lambda: (metrics.get_sample_value("cdcd_exists_filter_builds_total",
                                                     {"table": "public.users", "reason": "drift"}) or 0) >= 1,
                   30, what="a drift rebuild")
        wait_until(lambda: d.daemon.exists_keeper.state["public.users"].get("last_build_reason") == "drift", 30)
        state = d.daemon.exists_keeper.state["public.users"]
        assert state["fp_estimate"] < 0.05
        cache = Cache(redis_server.url, CacheOptions(prefix=cfg["keyspace"]["prefix"]))
        try:
            gone = sum(absent(cache.exists, cache.link.call, cache.stats, "users", f"user:{i}")
                       for i in range(1, 3001))
        finally:
            cache.close()
        assert gone >= 2900  # deleted rows read as absent again
    finally:
        d.stop()


def test_daemon_stopped_mid_build_answers_maybe_then_rebuilds(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any, r: redis.Redis) -> None:
    _insert(sql, range(1, 5001))
    data = _with_filter(cfg)
    d1 = DaemonThread(make_config(data))
    d1.daemon.exists_keeper.after_page = lambda rel: d1.daemon.stop()  # stop after the first page of 2000
    d1.start()
    d1.thread.join(30)
    meta = _meta(r, cfg)
    assert b"bid" in meta and b"a" not in meta  # a build begun, not finished
    cache = Cache(redis_server.url, CacheOptions(prefix=cfg["keyspace"]["prefix"]))
    try:
        # unseeded: "maybe" for everything, so the loader answers
        assert cache.get_or_load("user:4999", _loader(app_db, 4999, []), exists_filter="users") == {"id": 4999,
                                                                                                     "name": "n"}
        _insert(sql, range(5001, 5101))  # while no daemon runs
        d2 = DaemonThread(make_config(data)).start()
        try:
            wait_until(lambda: _seeded(r, cfg), 30, what="filter seeded by the second daemon")
            pos = commit_position(psycopg.connect(app_db, autocommit=True))
            assert cache.wait_applied(pos, timeout=10)
            missing = [i for i in range(1, 5101)
                       if absent(cache.exists, cache.link.call, cache.stats, "users", f"user:{i}")]
            assert missing == []
        finally:
            d2.stop()
    finally:
        cache.close()


def test_a_degraded_transaction_or_a_lost_filter_answers_maybe_until_rebuilt(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any, r: redis.Redis) -> None:
    """A transaction too big to keep its rows cannot tell the filter its inserts: the filter must stop
    answering "absent" in the same round trip, then come back from a snapshot that has them."""
    data = _with_filter(cfg)
    data["source"] = {**data["source"], "max_transaction_changes": 100}
    d = DaemonThread(make_config(data))
    d.daemon.sink.packed = False  # the redis-py pipeline path (a cluster client's); the other tests send packed
    d.start()
    cache = Cache(redis_server.url, CacheOptions(prefix=cfg["keyspace"]["prefix"]))
    try:
        wait_until(lambda: _seeded(r, cfg), 30, what="filter seeded")
        with psycopg.connect(app_db, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'd' || i || '@x', 'n', 1 "
                             "FROM generate_series(1, 300) i")
            pos = commit_position(conn)
        assert cache.wait_applied(pos, timeout=10)
        assert not any(absent(cache.exists, cache.link.call, cache.stats, "users", f"user:{i}")
                       for i in range(1, 301))
        wait_until(lambda: _seeded(r, cfg, generation=2), 30, what="filter rebuilt")
        assert not any(absent(cache.exists, cache.link.call, cache.stats, "users", f"user:{i}")
                       for i in range(1, 301))
        assert absent(cache.exists, cache.link.call, cache.stats, "users", "user:123456")
        # Redis loses the active bitmap (eviction), then everything (a flush): "maybe" until re-seeded
        meta, *bitmaps = Keyspace(cfg["keyspace"]["prefix"]).exists_filter("users")
        r.delete(bitmaps[int(_meta(r, cfg)[b"a"])])
        assert not absent(cache.exists, cache.link.call, cache.stats, "users", "user:123456")
        wait_until(lambda: _seeded(r, cfg, generation=3), 30, what="rebuilt after the bitmap was lost")
        assert absent(cache.exists, cache.link.call, cache.stats, "users", "user:123456")
        r.delete(meta, *bitmaps)
        assert not absent(cache.exists, cache.link.call, cache.stats, "users", "user:123456")
        wait_until(lambda: _seeded(r, cfg), 30, what="re-seeded after the filter was lost")
        assert absent(cache.exists, cache.link.call, cache.stats, "users", "user:123456")
        assert not any(absent(cache.exists, cache.link.call, cache.stats, "users", f"user:{i}")
                       for i in range(1, 301))
    finally:
        cache.close()
        d.stop()


def test_ten_million_keys_at_one_percent_take_about_twelve_megabytes(r: redis.Redis) -> None:
    rules = parse_config("""
source: {dsn: "postgresql://x"}
keyspace: {prefix: "PREFIX"}
tables:
  users: {keys: ["user:{id}"], exists_filter: {key: "user:{id}", expected: 10_000_000, fp_rate: 0.01}}
""".replace("PREFIX", unique("mem") + ":")).rules()
    r.script_load(SCRIPTS["exists_begin"].source)
    writes = ExistsWrites(r, rules.keyspace, rules.exists)
    slot = writes.begin("public.users", "b1")
    meta, *bitmaps = rules.keyspace.exists_filter("users")
    try:
        used = int(r.memory_usage(bitmaps[int(slot)]) or 0) + int(r.memory_usage(meta) or 0)
        assert 11_981_323 <= r.strlen(bitmaps[int(slot)]) <= 11_981_324
        assert used < 13 * 2**20, used  # the textbook ~12 MB (11.98 MB of bits, rounded up by the allocator)
    finally:
        r.delete(meta, *bitmaps)


def test_the_daemons_lua_sets_exactly_the_bits_the_client_reads(r: redis.Redis) -> None:
    """The daemon sends two numbers per key and Lua walks the offsets; the client computes them in Python."""
    rules = parse_config("""
source: {dsn: "postgresql://x"}
keyspace: {prefix: "PREFIX"}
tables:
  users: {keys: ["user:{id}"], exists_filter: {key: "user:{id}", expected: 3_000_000, fp_rate: 0.001}}
""".replace("PREFIX", unique("lua") + ":")).rules()
    spec = rules.exists["public.users"]
    for s in SCRIPTS.values():
        r.script_load(s.source)
    writes = ExistsWrites(r, rules.keyspace, rules.exists)
    slot = writes.begin("public.users", "b1")
    keys = [f"user:{i}" for i in range(0, 3000, 3)] + ["user:caf\u00e9", "user:x%3Ay"]
    batch = Batch(version=5, exists={"public.users": keys})
    pipe = r.pipeline(transaction=False)
    for cmd in writes.batch_commands(batch):  # sets the bits in the generation being built
        pipe.execute_command(*cmd)
    assert pipe.execute() == [1]
    meta, *bitmaps = rules.keyspace.exists_filter("users")
    try:
        want = {p for k in keys for p in positions(k, spec.params.m, spec.params.k)}
        assert max(want) > 0.99 * spec.params.m  # the running sum wraps around m as in Python
        assert r.bitcount(bitmaps[int(slot)]) == len(want)
        pipe = r.pipeline(transaction=False)
        for p in want:
            pipe.getbit(bitmaps[int(slot)], p)
        assert all(pipe.execute())
    finally:
        r.delete(meta, *bitmaps)
