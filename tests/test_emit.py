"""Explicit invalidations emitted from application code through every driver an app uses (issue 10
item 4): applied at the transaction's version, atomic with it, never applied on rollback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg2
import pytest
import redis

from cdcd.client.emit import aemit_invalidation, emit_invalidation, invalidation_message
from cdcd.devservers import RedisServer
from tests.djangoenv import use_database
from tests.helpers import DaemonThread, entry, make_config, wait_until

ORDER = "INSERT INTO orders VALUES (%s, 1, 7, 1.00, 'new')"


class Rollback(Exception):
    pass


def _psycopg3_conn(dsn: str, oid: int, kind: str, fail: bool) -> None:
    with psycopg.connect(dsn) as conn, contextlib.suppress(Rollback), conn.transaction():
        conn.execute(ORDER, (oid,))
        emit_invalidation(conn, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
        if fail:
            raise Rollback


def _psycopg3_cursor(dsn: str, oid: int, kind: str, fail: bool) -> None:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, contextlib.suppress(Rollback), conn.transaction():
        cur.execute(ORDER, (oid,))
        emit_invalidation(cur, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
        if fail:
            raise Rollback


def _psycopg2(dsn: str, oid: int, kind: str, fail: bool, use_cursor: bool) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(ORDER, (oid,))
            emit_invalidation(cur if use_cursor else conn, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
        conn.rollback() if fail else conn.commit()
    finally:
        conn.close()


def _sqlalchemy(dsn: str, oid: int, kind: str, fail: bool, session: bool) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        if session:
            with Session(engine) as s:
                s.execute(text("INSERT INTO orders VALUES (:id, 1, 7, 1.00, 'new')"), {"id": oid})
                emit_invalidation(s, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
                s.rollback() if fail else s.commit()
        else:
            with engine.connect() as c:
                c.execute(text("INSERT INTO orders VALUES (:id, 1, 7, 1.00, 'new')"), {"id": oid})
                emit_invalidation(c, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
                c.rollback() if fail else c.commit()
    finally:
        engine.dispose()


def _django(dsn: str, oid: int, kind: str, fail: bool) -> None:
    from django.db import transaction

    conn = use_database("cdcd_emit", dsn)
    try:
        with contextlib.suppress(Rollback), transaction.atomic(using="cdcd_emit"):
            with conn.cursor() as cur:
                cur.execute(ORDER, (oid,))
            emit_invalidation(conn, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
            if fail:
                raise Rollback
    finally:
        conn.close()


def _psycopg3_async(dsn: str, oid: int, kind: str, fail: bool) -> None:
    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            with contextlib.suppress(Rollback):
                async with conn.transaction():
                    await conn.execute(ORDER, (oid,))
                    await aemit_invalidation(conn, keys=[f"report:{kind}"], tags=[f"dash:{kind}"])
                    if fail:
                        raise Rollback

    asyncio.run(run())


KINDS: dict[str, Callable[[str, int, str, bool], None]] = {
    "psycopg3-conn": _psycopg3_conn,
    "psycopg3-cursor": _psycopg3_cursor,
    "psycopg3-async": _psycopg3_async,
    "psycopg2-conn": lambda d, o, k, f: _psycopg2(d, o, k, f, use_cursor=False),
    "psycopg2-cursor": lambda d, o, k, f: _psycopg2(d, o, k, f, use_cursor=True),
    "sqlalchemy-conn": lambda d, o, k, f: _sqlalchemy(d, o, k, f, session=False),
    "sqlalchemy-session": lambda d, o, k, f: _sqlalchemy(d, o, k, f, session=True),
    "django": _django,
}


@pytest.fixture
def daemon(cfg: dict[str, Any]) -> Iterator[DaemonThread]:
    d = DaemonThread(make_config(cfg)).start()
    try:
        yield d
    finally:
        d.stop()


def test_every_driver_emits_an_invalidation_atomic_with_its_transaction(
        cfg: dict[str, Any], r: redis.Redis, app_db: str, daemon: DaemonThread) -> None:
    p = cfg["keyspace"]["prefix"]
    for i, (kind, run) in enumerate(KINDS.items()):
        run(app_db, 1000 + 2 * i, f"{kind}-rolled-back", True)
        run(app_db, 1001 + 2 * i, kind, False)
    for i, kind in enumerate(KINDS):
        order = f"{p}order:{1001 + 2 * i}"
        wait_until(lambda: entry(r, order), what=f"{kind}: the order row applied")  # noqa: B023
        tomb = entry(r, f"{p}report:{kind}")
        assert tomb, f"{kind}: the explicit key was invalidated"
        assert "d" not in tomb, f"{kind}: a tombstone, not a value"
        assert tomb["v"] == entry(r, f"{p}order:{1001 + 2 * i}")["v"], f"{kind}: at its transaction's version"
        assert r.get(f"{p}#tag:dash:{kind}") is not None, f"{kind}: the tag was bumped"
        # the rolled-back transaction emitted nothing: no tombstone, no tag, no row
        assert not entry(r, f"{p}report:{kind}-rolled-back"), kind
        assert r.get(f"{p}#tag:dash:{kind}-rolled-back") is None, kind
        assert not entry(r, f"{p}order:{1000 + 2 * i}"), kind
    assert daemon.error is None and daemon.daemon.metrics.dead_letters._value.get() == 0


def test_a_filled_value_is_dropped_by_the_apps_invalidation(
        cfg: dict[str, Any], r: redis.Redis, redis_server: RedisServer, app_db: str, daemon: DaemonThread) -> None:
    """The point of it: a value the rules cannot see (a report) is filled by the app, then a write
    that changes what it was computed from emits its key; every reader misses and recomputes."""
    from cdcd.client import Cache, CacheOptions

    p = cfg["keyspace"]["prefix"]
    computed = {"n": 0}

    def report() -> dict[str, int]:
        computed["n"] += 1
        with psycopg.connect(app_db) as conn:
            return {"orders": conn.execute("SELECT count(*) FROM orders").fetchone()[0]}  # type: ignore[index]

    cache = Cache(redis_server.url, CacheOptions(prefix=p))
    try:
        wait_until(lambda: r.exists(f"{p}#cdcd:rules"), what="the daemon's registry")
        first = cache.get_or_load("report:orders", report)
        assert cache.get_or_load("report:orders", report) == first and computed["n"] == 1  # served from Redis
        with psycopg.connect(app_db) as conn, conn.transaction():
            conn.execute(ORDER, (4242,))
            emit_invalidation(conn, keys=["report:orders"])
        wait_until(lambda: "d" not in entry(r, f"{p}report:orders"), what="the report invalidated")
        # the backplane drops L1 too: every reader recomputes from the database
        wait_until(lambda: cache.get_or_load("report:orders", report) == {"orders": first["orders"] + 1},
                   what="the report recomputed")
        assert computed["n"] >= 2
    finally:
        cache.close()


@pytest.mark.parametrize("keys,tags,error", [
    ([], [], ValueError),
    (["user:#cdcd:rules"], [], ValueError),  # cdcd's own names are refused at the call
    ([], ["a#b"], ValueError),
    ("user:1", [], TypeError),  # a string is not a list of names
    ([1], [], TypeError),
    ([""], [], ValueError),
])
def test_bad_names_fail_at_the_call(keys: Any, tags: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        invalidation_message(keys, tags)


def test_async_handle_through_the_sync_call_fails_loudly(app_db: str) -> None:
    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(app_db) as conn:
            with pytest.raises(TypeError, match="aemit_invalidation"):
                emit_invalidation(conn, keys=["k:1"])
            with pytest.raises(TypeError, match="synchronous"), psycopg.connect(app_db) as sync_conn:
                await aemit_invalidation(sync_conn, keys=["k:1"])

    asyncio.run(run())


def test_unknown_handle_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot execute SQL"):
        emit_invalidation(object(), keys=["k:1"])
