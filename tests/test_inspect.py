"""The consistency inspector against the real daemon: no false alarms, real staleness found, in-flight tolerated."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml

from cdcd.devservers import PostgresServer, RedisServer
from cdcd.fillguard import FillGuard
from cdcd.inspect import EXIT_INCONCLUSIVE, EXIT_OK, EXIT_STALE, InspectReport, TokenBucket, run_inspect
from cdcd.keyspace import Keyspace
from tests.helpers import EXAMPLE_SCHEMA, ROOT, DaemonThread, config_dict, entry, make_config, unique, wait_until


@pytest.fixture(scope="module")
def ts_pg() -> Iterator[PostgresServer]:
    """A cluster with track_commit_timestamp on (a restart-only setting), so app values can be dated."""
    server = PostgresServer(extra_conf={"track_commit_timestamp": "on"})
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def icfg(ts_pg: PostgresServer, redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    name = unique("db")
    dsn = ts_pg.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXAMPLE_SCHEMA.read_text())
    yield config_dict(dsn, redis_server.url, unique("s"), unique("p") + ":")
    with psycopg.connect(ts_pg.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        for _ in range(50):
            slots = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s AND NOT active",
                                 (name,)).fetchall()
            for (slot,) in slots:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", (name,)).fetchone():
                break
            time.sleep(0.1)
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def inspect(cfg: dict[str, Any], settle: float = 10.0, **kw: Any) -> InspectReport:
    out = io.StringIO()
    report = run_inspect(make_config(cfg), kw.pop("sample", 1000), kw.pop("all_rows", False), kw.pop("rate", 100000),
                         kw.pop("threshold", 0.0), settle, out, **kw)
    text = out.getvalue()
    assert "result:" in text  # the human report was printed
    return report


def _populate(dsn: str, r: redis.Redis, prefix: str, n: int = 40) -> None:
    """Users and orders with inserts, updates (one of a key column), deletes; orders filled by the app."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(1, n + 1):
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, %s)",
                         (i, f"u{i}@x", f"n{i}", i % 3))
            conn.execute("INSERT INTO orders VALUES (%s, %s, %s, %s, 'new')", (i, i, i % 3, i * 1.25))
        for i in range(1, n + 1, 3):
            conn.execute("UPDATE users SET name = name || '!', email = %s WHERE id = %s", (f"v{i}@x", i))
            conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (i,))
        conn.execute("DELETE FROM users WHERE id = %s", (n,))
        conn.execute("DELETE FROM orders WHERE id = %s", (n,))


def _applied(r: redis.Redis, prefix: str) -> int:
    v = r.hget(f"{prefix}#cdcd:applied", "version")
    return int(v) if v else 0


def _caught_up(dsn: str, r: redis.Redis, prefix: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO orders VALUES (999999, 0, 0, 0, 'marker') ON CONFLICT (id) DO UPDATE "
                     "SET status = 'marker2'")
        lsn = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0]
    wait_until(lambda: _applied(r, prefix) >= lsn - 4096 and entry(r, f"{prefix}order:999999"), timeout=20,
               what="daemon caught up")


def _daemon_with_users(icfg: dict[str, Any], r: redis.Redis, n: int = 10) -> DaemonThread:
    """A running daemon that has cached ``n`` users and caught up: the starting point of the staleness tests."""
    p, dsn = icfg["keyspace"]["prefix"], icfg["source"]["dsn"]
    d = DaemonThread(make_config(icfg)).start()
    try:
        _populate(dsn, r, p, n=n)
        _caught_up(dsn, r, p)
    except BaseException:
        d.stop()
        raise
    return d

def _fill_orders(dsn: str, r: redis.Redis, prefix: str, ids: range) -> int:
    """Cache-aside through the fill guard, as an application would; returns how many fills landed."""
    guard = FillGuard(r, Keyspace(prefix))
    filled = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in ids:
            e = guard.read(f"order:{i}")
            row = conn.execute("SELECT id, status FROM orders WHERE id = %s", (i,)).fetchone()
            if row is None:
                filled += guard.fill(e, None, ttl=300, negative=True)
            else:
                filled += guard.fill(e, json.dumps({"id": row[0], "status": row[1]}).encode(), ttl=300)
    return filled


def test_clean_state_reports_nothing_stale(icfg: dict[str, Any], r: redis.Redis) -> None:
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    d = DaemonThread(make_config(icfg)).start()
    try:
        _populate(dsn, r, p)
        _caught_up(dsn, r, p)
        assert _fill_orders(dsn, r, p, range(1, 45)) >= 40
        for mode in ({"sample": 1000}, {"all_rows": True, "sample": None}):
            rep = inspect(icfg, **mode)
            assert rep.stale == [] and rep.unsettled == []
            assert rep.exit_code == EXIT_OK
            assert rep.commit_timestamps
            users = rep.tables["public.users"]
            assert users.rows == 39 and users.keys == 78  # two keys per row; old keys hold tombstones
            assert users.fresh == 78  # every daemon-written projection matches the row read back
            orders = rep.tables["public.orders"]
            assert orders.fresh >= 40  # guarded app fills, dated after the rows' last change
            assert rep.orphan_keys_checked >= 1  # the deleted user's negative/tombstone keys were looked at
            assert rep.consistency_ratio == 1.0
    finally:
        d.stop()


def test_lost_invalidation_of_a_daemon_value_is_stale_and_exits_1(icfg: dict[str, Any], r: redis.Redis,
                                                                  tmp_path: Path) -> None:
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    d = _daemon_with_users(icfg, r)
    try:
        old = entry(r, f"{p}user:2")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE users SET name = 'renamed' WHERE id = 2")
        wait_until(lambda: json.loads(entry(r, f"{p}user:2")["d"])["name"] == "renamed", what="update applied")
        # the invalidation is "lost": the entry goes back to the old projection at the old version
        r.delete(f"{p}user:2")
        r.hset(f"{p}user:2", mapping=old)
        r.pexpire(f"{p}user:2", 600_000)
        rep = inspect(icfg, settle=10)
        assert [s.key for s in rep.stale] == [f"{p}user:2"]
        stale = rep.stale[0]
        assert stale.writer == "cdc" and stale.entry_version == int(old["v"])
        assert stale.lsn_gap_max is not None and stale.lsn_gap_max > 0
        assert stale.stale_seconds is not None and stale.stale_seconds > 0  # written before the rename committed
        assert rep.exit_code == EXIT_STALE
        assert rep.heartbeats >= 1  # the database was idle: the inspector moved the daemon's version on
        # the command line says the same, with exit code 1 and the key named
        cfg_file = tmp_path / "cdcd.yaml"
        cfg_file.write_text(yaml.safe_dump(icfg))
        res = subprocess.run([sys.executable, "-m", "cdcd.cli", "inspect", "--config", str(cfg_file), "--json"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 1, res.stderr
        out = json.loads(res.stdout)
        assert out["stale"] == 1 and out["stale_entries"][0]["key"] == f"{p}user:2"
        # a tolerated ratio turns it into a pass
        assert inspect(icfg, threshold=0.5).exit_code == EXIT_OK
    finally:
        d.stop()


def test_stale_app_fill_deleted_row_and_negative_entry(icfg: dict[str, Any], r: redis.Redis) -> None:
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    d = _daemon_with_users(icfg, r)
    try:
        _fill_orders(dsn, r, p, range(1, 10))
        filled = entry(r, f"{p}order:3")
        assert filled["s"] == "app" and "d" in filled
        deleted_user = entry(r, f"{p}user:5")
        time.sleep(0.2)  # dating needs the fill to precede the change by more than the clock margin (50 ms)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE orders SET status = 'shipped' WHERE id = 3")
            conn.execute("DELETE FROM users WHERE id = 5")
            conn.execute("INSERT INTO orders VALUES (500, 1, 1, 1.00, 'new')")
        wait_until(lambda: "d" not in entry(r, f"{p}order:3") and "d" not in entry(r, f"{p}user:5")
                   and entry(r, f"{p}order:500"), what="changes applied")
        # lost invalidations: the app's pre-change fill, the deleted user's value, and a "not found"
        # for an order that exists
        for key, fields in ((f"{p}order:3", filled), (f"{p}user:5", deleted_user),
                            (f"{p}order:500", {**entry(r, f"{p}order:500"), "s": "app", "n": "1"})):
            r.delete(key)
            r.hset(key, mapping=fields)
            r.pexpire(key, 600_000)
        rep = inspect(icfg)
        found = {s.key: s for s in rep.stale}
        assert set(found) == {f"{p}order:3", f"{p}user:5", f"{p}order:500"}
        assert found[f"{p}order:3"].writer == "app" and found[f"{p}order:3"].stale_seconds > 0
        assert "no row" in found[f"{p}user:5"].reason
        assert "not found" in found[f"{p}order:500"].reason
        assert rep.exit_code == EXIT_STALE
    finally:
        d.stop()


def test_in_flight_change_is_unsettled_never_stale(icfg: dict[str, Any], r: redis.Redis) -> None:
    """Daemon stopped, row committed: the entry disagrees, but the change is in flight, not lost."""
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    config = make_config(icfg)
    d = DaemonThread(config).start()
    _populate(dsn, r, p, n=10)
    _caught_up(dsn, r, p)
    d.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET name = 'while the daemon is down' WHERE id = 4")
    assert json.loads(entry(r, f"{p}user:4")["d"])["name"] != "while the daemon is down"

    # 1. nobody applies it within the settle window: reported unsettled, inconclusive, not stale
    t0 = time.monotonic()
    rep = inspect(icfg, settle=1.0)
    assert time.monotonic() - t0 >= 1.0  # it waited for the daemon before giving up
    assert rep.stale == []
    assert sorted(rep.unsettled) == [f"{p}user:4", f"{p}user:email:v4@x"]  # both keys of the row
    assert rep.exit_code == EXIT_INCONCLUSIVE

    # 2. the daemon comes back while the inspector waits: the candidate resolves as in flight
    d2 = DaemonThread(config)
    starter = threading.Timer(1.0, d2.start)
    starter.start()
    try:
        rep = inspect(icfg, settle=20.0)
        assert rep.stale == [] and rep.unsettled == []
        assert rep.in_flight >= 1
        assert rep.exit_code == EXIT_OK
        assert json.loads(entry(r, f"{p}user:4")["d"])["name"] == "while the daemon is down"
    finally:
        starter.join()
        wait_until(lambda: d2.daemon.ready.is_set(), what="second daemon ready")
        d2.stop()


def test_without_commit_timestamps_app_values_are_unverifiable(cfg: dict[str, Any], r: redis.Redis,
                                                               app_db: str) -> None:
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    try:
        _populate(app_db, r, p, n=10)
        _caught_up(app_db, r, p)
        _fill_orders(app_db, r, p, range(1, 10))
        rep = inspect(cfg)
        assert not rep.commit_timestamps
        assert rep.tables["public.orders"].unverifiable >= 8
        assert rep.tables["public.users"].fresh == 18
        assert rep.stale == [] and rep.exit_code == EXIT_OK
        assert any("track_commit_timestamp" in n for n in rep.notes)
    finally:
        d.stop()


def test_rate_limit_paces_work() -> None:
    bucket = TokenBucket(2000)
    t0 = time.monotonic()
    for _ in range(30):
        bucket.take(100)  # 3000 units: one second's burst, then 1000 more at 2000/s
    assert time.monotonic() - t0 >= 0.45


def test_a_kafka_source_is_refused_clearly(cfg: dict[str, Any]) -> None:
    """Rows come from Postgres and settling compares slot LSNs: a Kafka configuration cannot be inspected."""
    from cdcd.inspect import InspectError

    cfg["source"] = {"type": "kafka", "bootstrap_servers": "127.0.0.1:1", "topics": ["t"]}
    with pytest.raises(InspectError, match="postgres source"):
        run_inspect(make_config(cfg), 10, False, 1000, 0.0, 1.0, None)
