"""One Postgres session definition for the daemon, warm and inspect (issue 15, item 7).

A server whose database defaults are not the ones pgtypes parses (time zone, date
and interval styles, float digits) must not change a single byte of what warm
writes compared with the daemon; and a rule over a generated column, which
logical replication never sends, is refused before anything runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from psycopg.conninfo import conninfo_to_dict

from cdcd.inspect import InspectError, Inspector
from cdcd.pg import session
from cdcd.warm import warm
from tests.helpers import ROOT, DaemonThread, config_dict, make_config, unique, wait_until

_TABLE = """
CREATE TABLE ev (
    id      int PRIMARY KEY,
    at      timestamptz NOT NULL,
    day     date,
    amount  float8,
    span    interval,
    doubled int GENERATED ALWAYS AS (id * 2) STORED
);
ALTER TABLE ev REPLICA IDENTITY FULL;
"""
_ROWS = ("INSERT INTO ev (id, at, day, amount, span) VALUES "
         "(1, '2026-03-01 23:30:00+00', '2026-03-01', 0.1, '1 day 02:03:04'), "
         "(2, '2026-12-31 20:00:00.123456+00', '1999-12-31', 1e-7, '-3 months'), "
         "(3, '2026-06-15 04:00:00-07', NULL, 12345.678901234567, NULL)")


def _values(r: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    return {k: r.hget(k, "d") or b"" for k in r.scan_iter(match=f"{prefix}ev:*", count=1000)}


@pytest.fixture
def odd_db(app_db: str, sql: Any) -> str:
    """The test database, with defaults unlike the session cdcd pins."""
    name = conninfo_to_dict(app_db)["dbname"]
    sql(f'ALTER DATABASE "{name}" SET timezone = \'Asia/Kolkata\'')
    sql(f'ALTER DATABASE "{name}" SET datestyle = \'SQL, DMY\'')
    sql(f'ALTER DATABASE "{name}" SET intervalstyle = \'sql_standard\'')
    sql(f'ALTER DATABASE "{name}" SET extra_float_digits = 0')
    sql(_TABLE)
    return app_db


def test_warm_writes_the_daemons_bytes_on_a_non_utc_server(odd_db: str, cfg: dict[str, Any], r: redis.Redis,
                                                             sql: Any) -> None:
    import psycopg

    with psycopg.connect(odd_db) as conn:  # the database's defaults really are in force for a plain session
        assert conn.execute("SHOW timezone").fetchone() == ("Asia/Kolkata",)
    cfg["tables"] = {"ev": {"keys": ["ev:{id}", "ev:at:{at}", "ev:day:{day}"], "action": "update"}}
    config = make_config(cfg)
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(config).start()
    try:
        sql(_ROWS)
        wait_until(lambda: len(_values(r, p)) == 8, what="daemon wrote 3 rows x 3 keys (one day is NULL)")
    finally:
        d.stop()
    by_daemon = _values(r, p)
    row1 = json.loads(by_daemon[f"{p}ev:1".encode()])
    assert row1["at"] == "2026-03-01T23:30:00+00:00" and "doubled" not in row1  # generated: never replicated
    r.delete(*by_daemon)

    report = warm(config, rate=0)
    assert report.tables[0].written == 8
    by_warm = _values(r, p)
    assert sorted(by_warm) == sorted(by_daemon)  # same keys (the time stamp is part of one)
    for k, v in by_daemon.items():
        assert by_warm[k] == v, k  # byte for byte


def test_rules_over_generated_columns_are_refused(odd_db: str, cfg: dict[str, Any], tmp_path: Path) -> None:
    cfg["tables"] = {"ev": {"keys": ["ev:{id}", "ev:double:{doubled}"], "action": "update"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "check", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "generated column 'doubled'" in res.stderr
    assert "logical replication does not send generated columns" in res.stderr
    config = make_config(cfg)
    with pytest.raises(ValueError, match="generated column 'doubled'"):
        warm(config, rate=0)
    cfg["tables"] = {"ev": {"keys": ["ev:{id}"], "action": "update", "columns": ["id", "doubled"]}}
    config = make_config(cfg)
    inspector = Inspector(config, rate=1000, settle_timeout=1)
    try:
        with pytest.raises(InspectError, match="projection uses generated column 'doubled'"):
            inspector.setup()
    finally:
        inspector.close()


def test_session_options_merge_with_the_users_own() -> None:
    dsn = session.conninfo("host=h dbname=d options='-c search_path=app'", read_only=True)
    opts = conninfo_to_dict(dsn)["options"]
    assert opts.startswith("-c search_path=app ") and "-c TimeZone=UTC" in opts
    assert opts.endswith("-c default_transaction_read_only=on")


def test_daemon_warm_and_inspect_agree_on_a_server_whose_time_zone_is_not_utc(redis_server: Any,
                                                                              r: redis.Redis) -> None:
    """The server's own ``timezone`` (postgresql.conf, not a database default) is not UTC: warm writes the
    daemon's keys and bytes, and inspect, reading rows on the same session, finds every entry fresh."""
    import psycopg

    from cdcd.devservers import PostgresServer
    from cdcd.inspect import EXIT_OK, run_inspect

    server = PostgresServer(extra_conf={"timezone": "Pacific/Chatham"})  # UTC+12:45 or +13:45
    server.start()
    try:
        dsn = server.create_database("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW timezone").fetchone() == ("Pacific/Chatham",)
            conn.execute(_TABLE)
        cfg = config_dict(dsn, redis_server.url, unique("s"), unique("p") + ":")
        cfg["tables"] = {"ev": {"keys": ["ev:{id}", "ev:at:{at}"], "action": "update"}}
        config = make_config(cfg)
        p = cfg["keyspace"]["prefix"]
        d = DaemonThread(config).start()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(_ROWS)
            wait_until(lambda: len(_values(r, p)) == 6, what="daemon wrote 3 rows x 2 keys")
            by_daemon = _values(r, p)
            assert f"{p}ev:at:2026-03-01T23%3A30%3A00+00%3A00".encode() in by_daemon  # rendered in UTC
            report = run_inspect(config, None, True, 0, 0.0, 10.0, None)
            assert report.exit_code == EXIT_OK and report.stale == [] and report.fresh == 6
        finally:
            d.stop()
        r.delete(*by_daemon)
        assert warm(config, rate=0).tables[0].written == 6
        by_warm = _values(r, p)
        assert by_warm == by_daemon  # same keys, byte-identical values
    finally:
        server.destroy()
