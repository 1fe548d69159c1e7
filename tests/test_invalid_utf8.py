"""A row value that is not valid UTF-8 (a SQL_ASCII database accepts any bytes) can neither crash the
daemon nor be skipped: its transaction falls back to table-wide invalidation, counted, and the stream
goes on."""

from __future__ import annotations

from typing import Any

import psycopg
import redis

from cdcd.devservers import PostgresServer, RedisServer
from tests.helpers import EXAMPLE_SCHEMA, DaemonThread, config_dict, entry, make_config, unique, wait_until


def test_invalid_utf8_in_a_read_column_invalidates_the_table_and_the_stream_goes_on(
        pg_server: PostgresServer, redis_server: RedisServer) -> None:
    name = unique("ascii")
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXAMPLE_SCHEMA.read_text())
    cfg: dict[str, Any] = config_dict(dsn, redis_server.url, unique("s"), unique("p") + ":")
    p = cfg["keyspace"]["prefix"]
    r = redis.Redis.from_url(redis_server.url)
    d = DaemonThread(make_config(cfg)).start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'ok', 1)")
            wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="a valid row applied")
            tag = f"{p}#tag:#table:public.users"
            before = int(r.get(tag) or 0)
            # 0xE9 alone is Latin-1 'é', invalid as UTF-8; the name column is in the projection
            conn.execute("UPDATE users SET name = convert_from('\\x636166e9'::bytea, 'SQL_ASCII') WHERE id = 1")
            wait_until(lambda: int(r.get(tag) or 0) > before, what="the table tag bumped: table-wide invalidation")
            assert d.error is None and d.thread.is_alive(), "the daemon did not crash"
            wait_until(lambda: d.daemon.metrics.degraded_transactions._value.get() == 1, what="counted")
            # the stream goes on: a later valid change applies
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (2, 'b@x', 'fine', 1)")
            wait_until(lambda: entry(r, f"{p}user:2").get("d"), what="a later change applied")
    finally:
        d.stop()
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE database = %s AND NOT active", (name,))


def test_a_latin1_database_renders_the_same_text_as_a_utf8_one(
        pg_server: PostgresServer, redis_server: RedisServer) -> None:
    """The stream is read as UTF-8 whatever the server stores: 'é' in a LATIN1 database is the key the
    application computes from the same row (which psycopg hands it as str)."""
    name = unique("latin")
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXAMPLE_SCHEMA.read_text())
    cfg: dict[str, Any] = config_dict(dsn, redis_server.url, unique("s"), unique("p") + ":")
    p = cfg["keyspace"]["prefix"]
    r = redis.Redis.from_url(redis_server.url)
    d = DaemonThread(make_config(cfg)).start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'josé@x', 'café', 1)")
        wait_until(lambda: entry(r, f"{p}user:email:josé@x").get("d"), what="the key with é")
        assert '"café"' in entry(r, f"{p}user:1")["d"]
        assert d.daemon.metrics.degraded_transactions._value.get() == 0
    finally:
        d.stop()
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE database = %s AND NOT active", (name,))
