"""The stale write-back race (design notes §2), reproduced step by step, with and without the fill guard."""

from __future__ import annotations

import json
from typing import Any

import redis

from cdcd.fillguard import FillGuard
from cdcd.keyspace import Keyspace
from tests.helpers import DaemonThread, entry, make_config, wait_until


def _order_status(sql: Any) -> str:
    return str(sql("SELECT status FROM orders WHERE id = 10").fetchone()[0])


def test_fill_guard_refuses_the_stale_write_back(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = cfg["keyspace"]["prefix"]
    guard = FillGuard(r, Keyspace(p))
    d = DaemonThread(make_config(cfg)).start()
    try:
        sql("INSERT INTO orders VALUES (10, 1, 7, 5.00, 'new')")
        wait_until(lambda: entry(r, f"{p}order:10"), what="insert applied")
        # 1. app A misses and takes its token, 2. A reads the row (old)
        token = guard.read("order:10")
        assert not token.hit and token.generation
        stale_row = {"id": 10, "status": _order_status(sql)}
        assert stale_row["status"] == "new"
        # B commits; the daemon applies the change
        v_before = int(entry(r, f"{p}order:10")["v"])
        sql("UPDATE orders SET status = 'paid' WHERE id = 10")
        wait_until(lambda: int(entry(r, f"{p}order:10")["v"]) > v_before, what="update applied")
        # 3. A writes its old row back through the guard: refused, nothing stale in Redis
        assert guard.fill(token, json.dumps(stale_row).encode(), ttl=300) is False
        assert "d" not in entry(r, f"{p}order:10")
        # the next reader gets a fresh token and fills the current row
        fresh = guard.read("order:10")
        row = {"id": 10, "status": _order_status(sql)}
        assert guard.fill(fresh, json.dumps(row).encode(), ttl=300) is True
        assert json.loads(entry(r, f"{p}order:10")["d"])["status"] == "paid"
    finally:
        d.stop()


def test_naive_delete_on_write_keeps_the_stale_value(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    """The same interleaving with plain GET/SET cache-aside and DEL on write: the stale row stays until TTL."""
    key = f"naive:{cfg['keyspace']['prefix']}order:10"
    sql("INSERT INTO orders VALUES (10, 1, 7, 5.00, 'new')")
    assert r.get(key) is None  # A misses
    stale_row = {"id": 10, "status": _order_status(sql)}  # A reads the old row
    sql("UPDATE orders SET status = 'paid' WHERE id = 10")  # B commits...
    r.delete(key)  # ...and deletes the cache entry, as delete-on-write prescribes
    r.set(key, json.dumps(stale_row), ex=300)  # A writes back what it read
    assert json.loads(r.get(key))["status"] == "new"  # stale
    assert _order_status(sql) == "paid"  # while the database says otherwise
    assert r.ttl(key) > 200  # and it stays until the TTL runs out


def test_lease_expiry_cannot_let_a_stale_fill_in(r: redis.Redis) -> None:
    """The ABA trap: the token's entry expires before the fill. The fill must fail, not match 'nothing'."""
    import time

    guard = FillGuard(r, Keyspace("aba:"), lease_ttl=0.05)
    token = guard.read("k")  # creates a 50 ms lease
    time.sleep(0.1)  # lease gone: the key holds nothing, exactly as before the token
    assert r.exists("aba:k") == 0
    assert guard.fill(token, b"stale", ttl=60) is False
    # eviction looks the same as expiry to the guard
    token = guard.read("k2")
    r.delete("aba:k2")
    assert guard.fill(token, b"stale", ttl=60) is False


def test_negative_entry_does_not_hide_an_insert(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    """Caching "not found" goes through the same guard: an insert between token and fill wins."""
    p = cfg["keyspace"]["prefix"]
    guard = FillGuard(r, Keyspace(p))
    d = DaemonThread(make_config(cfg)).start()
    try:
        token = guard.read("order:55")
        assert sql("SELECT 1 FROM orders WHERE id = 55").fetchone() is None  # not found
        sql("INSERT INTO orders VALUES (55, 1, 7, 5.00, 'new')")
        wait_until(lambda: entry(r, f"{p}order:55").get("s") == "cdc", what="insert applied")
        assert guard.fill(token, None, ttl=30, negative=True) is False
        assert "n" not in entry(r, f"{p}order:55")
    finally:
        d.stop()
