"""Real servers for the whole suite: one Postgres cluster and one Redis, started from the installed binaries.

Each test gets its own database, slot, publication and keyspace prefix, so tests
never see each other's data. Tests that stop or pause Redis use their own server
(``private_redis``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from cdcd.devservers import PostgresServer, RedisServer
from tests.helpers import EXAMPLE_SCHEMA, config_dict, unique


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``soak`` tests run only when an ``-m`` expression names them (``pytest -m soak tests/test_soak.py``).

    Done here rather than with ``addopts = -m "not soak"``: a second ``-m`` on the command line (the
    fast path ``-m "not slow"``) replaces the first, which would silently bring the soak back.
    """
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if item.get_closest_marker("soak") is None]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    """A Postgres cluster for one test module alone: for tests that change server-wide settings
    (synchronous_standby_names), which would reach every other test on the shared server."""
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.resume()
    server.stop()


@pytest.fixture
def app_db(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database with the example schema; its slots are dropped afterwards."""
    name = unique("db")
    dsn = pg_server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXAMPLE_SCHEMA.read_text())
    yield dsn
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE database = %s AND active_pid IS NOT NULL", (name,))
        for _ in range(50):
            rows = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s AND NOT active",
                                (name,)).fetchall()
            for (slot,) in rows:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", (name,)).fetchone():
                break
            time.sleep(0.1)
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


@pytest.fixture
def cfg(app_db: str, redis_server: RedisServer) -> dict[str, Any]:
    """Configuration dict (example rules) for this test's database, slot and prefix."""
    return config_dict(app_db, redis_server.url, unique("s"), unique("p") + ":")


@pytest.fixture
def sql(app_db: str) -> Iterator[Any]:
    """Run statements in autocommit mode against the test database."""
    conn = psycopg.connect(app_db, autocommit=True)

    def run(query: str, params: Any = None) -> Any:
        return conn.execute(query, params)

    yield run
    conn.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
