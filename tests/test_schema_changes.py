"""DDL while the daemon runs (issue 15, item 3): a rename, a drop or a lost key column is loud and safe.

Loud: /readyz and ``cdcd status`` turn not ready with a reason naming the rule and the DDL, a metric counts it.
Safe: the table tag of the broken table is bumped (so every entry derived from it stops validating) and every
later change of that table bumps it again; other tables keep flowing. ``ADD COLUMN`` changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.helpers import DaemonThread, entry, make_config, wait_until
from tests.test_ops import get


@pytest.fixture
def running(cfg: dict[str, Any], sql: Any, r: redis.Redis) -> Iterator[dict[str, Any]]:
    """A daemon with rules for acct (update, REPLICA IDENTITY FULL) and the example tables; acct:1 cached."""
    sql("CREATE TABLE acct (id int PRIMARY KEY, email text NOT NULL, name text)")
    sql("ALTER TABLE acct REPLICA IDENTITY FULL")
    cfg["tables"]["acct"] = {"keys": ["acct:{id}", "acct:email:{email}"], "action": "update"}
    d = DaemonThread(make_config(cfg)).start()
    p = cfg["keyspace"]["prefix"]
    base = f"http://127.0.0.1:{d.daemon.http.port}"
    try:
        sql("INSERT INTO acct VALUES (1, 'a@x', 'Ann')")
        wait_until(lambda: entry(r, f"{p}acct:1").get("d"), what="acct:1 cached by the daemon")
        assert get(base + "/readyz")[0] == 200
        yield {"d": d, "p": p, "base": base}
    finally:
        d.stop()


def _tag(r: redis.Redis, p: str) -> int:
    return int(r.get(f"{p}#tag:#table:public.acct") or 0)


def _entry_valid(r: redis.Redis, p: str, key: str) -> bool:
    """What a reader checks: the entry's recorded table-tag counter equals the current one."""
    e = entry(r, f"{p}{key}")
    if "d" not in e:
        return False
    snap = json.loads(e["t"])
    return all(r.get(f"{p}#tag:{tag}") == str(counter).encode() for tag, counter in snap.items())


def _assert_broken(ctx: dict[str, Any], r: redis.Redis, sql: Any, kind: str, words: list[str]) -> None:
    p, base, d = ctx["p"], ctx["base"], ctx["d"]
    # everything derived from acct is invalidated at once: the cached value no longer validates
    wait_until(lambda: not _entry_valid(r, p, "acct:1"), what="acct:1 invalidated by the table tag")
    wait_until(lambda: get(base + "/readyz")[0] == 503, what="not ready after the DDL")
    reasons = json.loads(get(base + "/readyz")[1])["reasons"]
    text = " ".join(reasons)
    assert "tables.public.acct" in text and all(w in text for w in words), reasons
    assert "REPLICA IDENTITY FULL" not in text  # acct has it: never advise it
    assert d.daemon.metrics.schema_changes.labels("public.acct", kind)._value.get() == 1
    # the other tables keep flowing
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (5, 'u@x', 'U', 1)")
    wait_until(lambda: entry(r, f"{p}user:5").get("d"), what="users still applied")


def test_rename_table_is_loud_and_invalidates(running: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = running["p"]
    tag0 = _tag(r, p)
    sql("ALTER TABLE acct RENAME TO acct_r")
    _assert_broken(running, r, sql, "renamed", ["renamed to public.acct_r", "rename tables.public.acct"])
    assert _tag(r, p) > tag0
    # later changes of the renamed table are never skipped silently: each bumps the tag again
    tag1 = _tag(r, p)
    sql("UPDATE acct_r SET name = 'Bea' WHERE id = 1")
    wait_until(lambda: _tag(r, p) > tag1, what="update of acct_r bumps the table tag")
    assert not _entry_valid(r, p, "acct:1")
    # cdcd status says why it is not ready (exit 1)
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "status", "--url", running["base"]],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "renamed to public.acct_r" in res.stdout, res.stdout + res.stderr


def test_drop_key_column_is_loud_and_invalidates(running: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = running["p"]
    tag0 = _tag(r, p)
    sql("ALTER TABLE acct DROP COLUMN email")
    _assert_broken(running, r, sql, "column_lost", ["['email']", "'acct:email:{email}'"])
    tag1 = _tag(r, p)
    assert tag1 > tag0
    sql("UPDATE acct SET name = 'Bea' WHERE id = 1")
    wait_until(lambda: _tag(r, p) > tag1, what="update of the broken table bumps the table tag")
    assert not _entry_valid(r, p, "acct:1")


def test_drop_table_is_loud_and_invalidates(running: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = running["p"]
    tag0 = _tag(r, p)
    sql("DROP TABLE acct")
    _assert_broken(running, r, sql, "dropped", ["dropped", "remove tables.public.acct"])
    assert _tag(r, p) > tag0


def test_add_column_keeps_working(running: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p, base = running["p"], running["base"]
    sql("ALTER TABLE acct ADD COLUMN note text")
    sql("UPDATE acct SET note = 'hi' WHERE id = 1")
    wait_until(lambda: json.loads(entry(r, f"{p}acct:1").get("d", "{}")).get("note") == "hi",
               what="the new column in the projection")
    assert _entry_valid(r, p, "acct:1")
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (6, 'v@x', 'V', 1)")
    wait_until(lambda: entry(r, f"{p}user:6").get("d"), what="users applied")
    assert get(base + "/readyz")[0] == 200
    assert running["d"].daemon.schema_guard.broken == {}


def test_rename_seen_only_at_reconnect_keeps_the_daemon_serving(running: dict[str, Any], r: redis.Redis,
                                                                  sql: Any) -> None:
    """The DDL commits and cdcd's sessions are cut in the same instant: the reconnect's schema check finds no
    table by the rules' name. That is the same break (found by OID), not a configuration error that ends
    the daemon and with it every other table."""
    p, d = running["p"], running["d"]
    tag0 = _tag(r, p)
    sql("ALTER TABLE acct RENAME TO acct_r; SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type <> 'autovacuum worker'")
    _assert_broken(running, r, sql, "renamed", ["renamed to public.acct_r"])
    assert _tag(r, p) > tag0
    assert d.thread.is_alive() and d.error is None
    assert d.daemon.metrics.errors.labels("source")._value.get() >= 1  # the stream was cut: it reconnected
