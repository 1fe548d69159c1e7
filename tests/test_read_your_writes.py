"""Read-your-writes (issue 13 item 1): a write then an immediate read through the cache never returns the
value from before the write, with the daemon slowed and with the database idle; without the feature the
same loop can be caught returning old values."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import pytest
import redis

from cdcd.client import (
    AsyncCache,
    Cache,
    CacheOptions,
    NotApplied,
    acommit_position,
    commit_position,
    format_position,
    parse_position,
)
from cdcd.devservers import RedisServer
from tests.helpers import DaemonThread, entry, make_config, wait_until
from tests.latency_proxy import LatencyProxy

ITERATIONS = int(os.environ.get("CDCD_RYW_ITERATIONS", "300"))  # 10000 for the long run (see the issue note)


@pytest.fixture
def slowed(cfg: dict[str, Any], redis_server: RedisServer) -> Iterator[DaemonThread]:
    """The daemon behind a proxy that adds 5 ms to every write it sends Redis: it trails the writer."""
    proxy = LatencyProxy(redis_server.port, 0.005)
    d = DaemonThread(make_config({**cfg, "redis": {**cfg["redis"], "url": proxy.url}})).start()
    try:
        yield d
    finally:
        d.stop()
        proxy.close()


def _user(dsn: str) -> Any:
    def load() -> dict[str, Any]:
        with psycopg.connect(dsn) as c:
            row = c.execute("SELECT id, email, name, tenant_id FROM users WHERE id = 1").fetchone()
            assert row is not None
            return {"id": row[0], "email": row[1], "name": row[2], "tenant_id": row[3]}
    return load


def test_write_then_read_never_returns_the_old_value(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any, slowed: DaemonThread) -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n0', 1)")
    p = cfg["keyspace"]["prefix"]
    cache = Cache(redis_server.url, CacheOptions(prefix=p, ryw_timeout=5, ryw_on_timeout="raise"))
    load = _user(app_db)
    try:
        assert cache.wait_subscribed()
        with psycopg.connect(app_db, autocommit=True) as conn:
            for i in range(1, ITERATIONS + 1):
                conn.execute("UPDATE users SET name = %s WHERE id = 1", (f"n{i}",))
                pos = commit_position(conn)
                got = cache.get_or_load("user:1", load, min_position=pos)
                assert got["name"] == f"n{i}", f"iteration {i}: read {got['name']!r} after committing n{i}"
        assert cache.stats.ryw_waits > 0, "the daemon trailed the writer: reads had to wait"
        assert cache.stats.ryw_timeouts == 0
    finally:
        cache.close()


def test_without_a_position_the_same_loop_reads_old_values(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any, slowed: DaemonThread) -> None:
    """The control: the loop above detects old values when the feature is not used."""
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n0', 1)")
    cache = Cache(redis_server.url, CacheOptions(prefix=cfg["keyspace"]["prefix"]))
    load = _user(app_db)
    old = 0
    try:
        assert cache.wait_subscribed()
        with psycopg.connect(app_db, autocommit=True) as conn:
            for i in range(1, 101):
                conn.execute("UPDATE users SET name = %s WHERE id = 1", (f"n{i}",))
                old += cache.get_or_load("user:1", load)["name"] != f"n{i}"
        assert old > 0, "expected the cache to trail the commit without read-your-writes"
    finally:
        cache.close()


def test_async_scope_and_decorator(cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any,
                                   slowed: DaemonThread) -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n0', 1)")

    async def main() -> None:
        cache = await AsyncCache.create(redis_server.url, CacheOptions(prefix=cfg["keyspace"]["prefix"],
                                                                       ryw_timeout=5, ryw_on_timeout="raise"))

        @cache.cached(key="user:{uid}")
        async def user(uid: int) -> dict[str, Any]:
            async with await psycopg.AsyncConnection.connect(app_db) as c:
                row = await (await c.execute("SELECT id, name FROM users WHERE id = %s", (uid,))).fetchone()
                assert row is not None
                return {"id": row[0], "name": row[1]}

        try:
            assert await cache.wait_subscribed()
            async with await psycopg.AsyncConnection.connect(app_db, autocommit=True) as conn:
                for i in range(1, ITERATIONS + 1):
                    await conn.execute("UPDATE users SET name = %s WHERE id = 1", (f"n{i}",))
                    pos = await acommit_position(conn)
                    with cache.read_your_writes(pos):
                        got = await user(1)
                    assert got["name"] == f"n{i}", f"iteration {i}: read {got['name']!r} after committing n{i}"
            assert cache.stats.ryw_timeouts == 0
        finally:
            await cache.close()

    asyncio.run(main())


def test_an_idle_database_still_moves_the_watermark(
        cfg: dict[str, Any], redis_server: RedisServer, r: redis.Redis, app_db: str, sql: Any) -> None:
    """A commit the daemon has no rule for (its WAL moves, nothing is published) is waited for through the
    server's keepalives, not until some later change."""
    sql("CREATE TABLE audit (id serial PRIMARY KEY, note text)")  # not in the rules or the publication
    d = DaemonThread(make_config(cfg)).start()
    cache = Cache(redis_server.url, CacheOptions(prefix=cfg["keyspace"]["prefix"]))
    try:
        assert cache.wait_subscribed()
        with psycopg.connect(app_db, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n0', 1)")
            assert cache.wait_applied(commit_position(conn), timeout=5)
            time.sleep(0.3)  # idle
            waits = []
            for _ in range(10):
                conn.execute("INSERT INTO audit (note) VALUES ('x')")
                pos = commit_position(conn)
                t0 = time.monotonic()
                assert cache.wait_applied(pos, timeout=5), "the watermark must follow the WAL while idle"
                waits.append(time.monotonic() - t0)
        print("idle waits", [round(w, 3) for w in waits])
        assert max(waits) < 2.0, f"waited {max(waits):.3f}s for an idle watermark"
        state = {k.decode(): v.decode() for k, v in r.hgetall(f"{cfg['keyspace']['prefix']}#cdcd:applied").items()}
        assert int(state["watermark"]) >= pos
        assert d.daemon.metrics.watermark._value.get() >= pos
    finally:
        cache.close()
        d.stop()


def test_not_applied_in_time_bypasses_or_raises_never_old(
        cfg: dict[str, Any], redis_server: RedisServer, r: redis.Redis, app_db: str, sql: Any) -> None:
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n0', 1)")
    load = _user(app_db)
    cache = Cache(redis_server.url, CacheOptions(prefix=p, ryw_timeout=0.3))
    try:
        wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="user 1 applied")
        assert cache.get_or_load("user:1", load)["name"] == "n0"
        d.stop()  # nobody applies the next commit
        with psycopg.connect(app_db, autocommit=True) as conn:
            conn.execute("UPDATE users SET name = 'n1' WHERE id = 1")
            pos = commit_position(conn)
        assert cache.get_or_load("user:1", load)["name"] == "n0"  # without a position: the cached value
        # with it: the database, uncached (bypass), never the old value
        assert cache.get_or_load("user:1", load, min_position=pos)["name"] == "n1"
        assert '"n0"' in entry(r, f"{p}user:1")["d"], "the bypassed value was not cached"
        assert cache.get("user:1", "MISS", min_position=pos) == "MISS"
        assert cache.stats.ryw_timeouts == 2
        strict = Cache(redis_server.url, CacheOptions(prefix=p, ryw_timeout=0.2, ryw_on_timeout="raise"))
        try:
            with pytest.raises(NotApplied, match=format_position(pos)):
                strict.get_or_load("user:1", load, min_position=pos)
            assert not strict.wait_applied(pos, timeout=0.1)
        finally:
            strict.close()
    finally:
        cache.close()
        d.stop()


def test_a_position_passes_between_processes_as_text(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any, slowed: DaemonThread) -> None:
    """A POST commits and hands the position on (a header, a cookie); a GET elsewhere reads fresh."""
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n0', 1)")
    p = cfg["keyspace"]["prefix"]
    reader = Cache(redis_server.url, CacheOptions(prefix=p, ryw_timeout=5, ryw_on_timeout="raise"))
    load = _user(app_db)
    try:
        assert reader.wait_subscribed()
        assert reader.get_or_load("user:1", load)["name"] == "n0"
        with psycopg.connect(app_db, autocommit=True) as conn:
            conn.execute("UPDATE users SET name = 'posted' WHERE id = 1")
            header = format_position(commit_position(conn))
        assert "/" in header
        with reader.read_your_writes(header):
            assert reader.get_or_load("user:1", load)["name"] == "posted"
    finally:
        reader.close()


def test_commit_position_through_every_driver_and_inside_a_writing_transaction(app_db: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    with psycopg.connect(app_db) as conn:  # not autocommit: the helper leaves it idle
        a = commit_position(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with conn.transaction():
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (5, 'e@x', 'e', 1)")
            with pytest.raises(RuntimeError, match="after the commit"):
                commit_position(conn)
            raise psycopg.Rollback()
    c2 = psycopg2.connect(app_db)
    try:
        b = commit_position(c2)
        assert c2.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        c2.close()
    engine = create_engine(app_db.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with Session(engine) as s:
            s.execute(text("INSERT INTO users (id, email, name, tenant_id) VALUES (6, 'f@x', 'f', 1)"))
            s.commit()
            c = commit_position(s)
    finally:
        engine.dispose()
    assert a <= b <= c


def test_positions_parse_and_format() -> None:
    assert parse_position("16/B374D848") == (0x16 << 32) + 0xB374D848
    assert format_position(parse_position("16/B374D848")) == "16/B374D848"
    assert parse_position(42) == 42 and parse_position("42") == 42
    for bad in ("", "x/y", "-1", "1/2/3", -5, 1.5, None, True):
        with pytest.raises(ValueError):
            parse_position(bad)  # type: ignore[arg-type]
