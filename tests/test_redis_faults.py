"""Redis faults never end the daemon, one refused key never blocks the stream, and a Redis that restarted
empty gets its registry back whoever reloaded the scripts first (issue 15: items 4, 1 second half, 7c)."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from cdcd.client import Cache, CacheOptions
from cdcd.devservers import RedisServer
from cdcd.keyspace import SCRIPTS
from tests.helpers import DaemonProcess, DaemonThread, db_users, entry, make_config, stale_users, wait_until


class SteadyWriter(threading.Thread):
    """Commits until stopped: transactions of 20 rows (inserts, then renames of random users), so the
    daemon's batches are big enough that a kill often lands while it is sending or reading."""

    def __init__(self, dsn: str, users: int = 400) -> None:
        super().__init__(daemon=True)
        self.dsn, self.users = dsn, users
        self.stop_event = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for start in range(1, self.users + 1, 20):
                    with conn.transaction():
                        for i in range(start, min(start + 20, self.users + 1)):
                            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, %s)",
                                         (i, f"u{i}@x", f"n{i}", i % 5))
                    self.commits += 1
                n = 0
                while not self.stop_event.is_set():
                    n += 1
                    with conn.transaction():
                        for uid in rng.sample(range(1, self.users + 1), 20):
                            conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"r{n}-{uid}", uid))
                    self.commits += 1
                    time.sleep(0.002)
        except BaseException as exc:
            self.error = exc


def _stale(r: redis.Redis, prefix: str, expected: dict[int, tuple[str, str]]) -> list[str]:
    """Keys whose entry holds a row that differs from the database (absent entries and tombstones are
    misses, not stale)."""
    bad = []
    for uid, (email, name) in expected.items():
        for key in (f"{prefix}user:{uid}", f"{prefix}user:email:{email}"):
            d = entry(r, key).get("d")
            if d is not None and (json.loads(d)["name"], json.loads(d)["email"]) != (name, email):
                bad.append(key)
    return bad


@pytest.mark.slow
def test_redis_sigkilled_15_times_under_writes_daemon_stays_up_and_converges(
        cfg: dict[str, Any], app_db: str, private_redis: RedisServer, workdir: Path) -> None:
    cfg = {**cfg, "redis": {**cfg["redis"], "url": private_redis.url}}
    p = cfg["keyspace"]["prefix"]
    r = redis.Redis.from_url(private_redis.url)
    daemon = DaemonProcess(cfg, workdir).start()
    writer = SteadyWriter(app_db)
    try:
        daemon.wait_ready()
        writer.start()
        rng = random.Random(15)
        for _ in range(15):
            time.sleep(rng.uniform(0.1, 0.4))
            private_redis.stop()  # SIGKILL: connections reset, replies cut mid-way
            time.sleep(rng.uniform(0.0, 0.15))
            private_redis.start()  # back empty
            assert daemon.proc is not None and daemon.proc.poll() is None, (
                f"cdcd run exited with {daemon.proc.returncode}: "
                f"{daemon.log_path.read_text(errors='replace')[-1500:]}")
        time.sleep(0.5)
        writer.stop_event.set()
        writer.join(30)
        assert writer.error is None and writer.commits > 50
        # Redis came back empty each time, so a user not renamed since the last restart has no entry:
        # that is a miss (the app reads the database), never stale. Every entry that is there converges
        # to the database...
        expected = db_users(app_db)
        wait_until(lambda: not _stale(r, p, expected), timeout=30, interval=0.2,
                   what="every cached row to equal the database after 15 Redis kills")
        # ...and the daemon still applies everything: one more change of every user fills every key.
        with psycopg.connect(app_db, autocommit=True) as conn:
            conn.execute("UPDATE users SET name = name || '.'")
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(r, p, expected), timeout=30, interval=0.2,
                   what="every user's cached row to equal the database after a change of every user")
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon must still be running"
        log = daemon.log_path.read_text(errors="replace")
        assert "cannot serve HTTP" not in log
        events = daemon.events()
        assert any(e.get("event") == "redis_unavailable" for e in events)
        assert not any(e.get("event") == "redis_refused" for e in events), "a restart is a fault, not a refusal"
        assert any(e.get("event") == "redis_restored" for e in events)
    finally:
        writer.stop_event.set()
        daemon.stop()


def test_wrongtype_entry_is_dead_lettered_repaired_and_the_stream_goes_on(
        cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    ks = d.daemon.rules.keyspace
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
        wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="user 1 applied")
        r.delete(f"{p}user:1")
        r.rpush(f"{p}user:1", "not a cdcd entry")  # as `redis-cli RPUSH` would: every HMGET on it is WRONGTYPE
        sql("UPDATE users SET name = 'b', email = 'b@x' WHERE id = 1")
        # the same transaction's other key is applied: the batch stood
        wait_until(lambda: '"b"' in entry(r, f"{p}user:email:b@x").get("d", ""), what="the rest of the batch")
        wait_until(lambda: r.xlen(ks.dead_letters) >= 1, what="the dead letter")
        (_, fields), = r.xrange(ks.dead_letters)
        assert fields[b"key"] == f"{p}user:1".encode()
        assert b"wrongtype" in fields[b"reason"] and b"WRONGTYPE" in fields[b"reason"]
        assert d.daemon.metrics.redis_refused.labels("wrongtype")._value.get() == 1
        # the key was made safe: a tombstone (a hash, no value) at the change's version
        assert r.type(f"{p}user:1") == b"hash"
        tomb = entry(r, f"{p}user:1")
        assert "d" not in tomb and int(tomb["v"]) > 0
        # later changes to the same key and to others are applied
        sql("UPDATE users SET name = 'c' WHERE id = 1")
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (2, 'z@x', 'z', 1)")
        wait_until(lambda: '"c"' in entry(r, f"{p}user:1").get("d", ""), what="a later change of the key")
        wait_until(lambda: entry(r, f"{p}user:2").get("d"), what="a later change of another key")
        assert d.thread.is_alive() and d.error is None
        # the checkpoint moved past the refused change
        state: dict[bytes, bytes] = r.hgetall(ks.applied)  # type: ignore[assignment]
        assert int(state[b"version"]) > int(tomb["v"])
    finally:
        d.stop()


def test_registry_restored_after_empty_restart_even_when_a_client_reloaded_the_scripts(
        cfg: dict[str, Any], app_db: str, private_redis: RedisServer, sql: Any) -> None:
    """Issue 15 item 7c as reported: Redis killed and restarted empty, a client reloads the scripts first,
    a client fills ``cfg:k3``, ``TRUNCATE cfg`` commits: neither the old nor a fresh client may keep
    serving the deleted row."""
    sql("CREATE TABLE cfg (k text PRIMARY KEY, v text NOT NULL)")
    sql("ALTER TABLE cfg REPLICA IDENTITY FULL")
    sql("INSERT INTO cfg VALUES ('k1', 'one'), ('k2', 'two'), ('k3', 'three')")
    cfg = {**cfg, "redis": {**cfg["redis"], "url": private_redis.url}}
    cfg["tables"] = {**cfg["tables"], "cfg": {"keys": ["cfg:{k}"], "action": "invalidate"}}
    prefix = cfg["keyspace"]["prefix"]
    calls = {"n": 0}

    def load_k3() -> Any:
        calls["n"] += 1
        with psycopg.connect(app_db) as conn:
            row = conn.execute("SELECT v FROM cfg WHERE k = 'k3'").fetchone()
        return None if row is None else row[0]

    d = DaemonThread(make_config(cfg)).start()
    old = Cache(private_redis.url, CacheOptions(prefix=prefix, backplane_ping=0.2))
    fresh: Cache | None = None
    try:
        assert old.wait_subscribed()
        assert old.get_or_load("cfg:k3", load_k3) == "three"
        private_redis.stop()
        private_redis.start()  # empty: registry, table counters and scripts gone
        r = redis.Redis.from_url(private_redis.url)
        for script in SCRIPTS.values():  # a client's NOSCRIPT reload loads every script, the daemon's too
            r.script_load(script.source)
        wait_until(lambda: old.stats.l1_resets >= 1 and old.wait_subscribed(0.01), what="old client reconnected")
        fresh = Cache(private_redis.url, CacheOptions(prefix=prefix))
        assert fresh.wait_subscribed()
        assert old.get_or_load("cfg:k3", load_k3) == "three"
        assert fresh.get_or_load("cfg:k3", load_k3) == "three"
        batches = d.daemon.applied_batches
        sql("TRUNCATE cfg")
        wait_until(lambda: d.daemon.applied_batches > batches, what="the TRUNCATE applied")
        time.sleep(0.2)  # backplane delivery
        before = calls["n"]
        for client in (old, fresh):
            assert client.get_or_load("cfg:k3", load_k3) is None, "served the truncated row"
        # the database answered (a "not found" it cached may then serve the other client)
        assert calls["n"] > before
        # the daemon noticed the restart by itself and put the registry back
        assert r.exists(d.daemon.rules.keyspace.registry)
        assert d.daemon.metrics.redis_restores._value.get() >= 1
        # and with the registry back, a later TRUNCATE reaches entries filled meanwhile
        sql("INSERT INTO cfg VALUES ('k3', 'again')")
        wait_until(lambda: fresh is not None and fresh.get_or_load("cfg:k3", load_k3) == "again",
                   what="fresh value")
        batches = d.daemon.applied_batches
        sql("TRUNCATE cfg")
        wait_until(lambda: d.daemon.applied_batches > batches, what="the second TRUNCATE applied")
        time.sleep(0.2)
        assert fresh.get_or_load("cfg:k3", load_k3) is None
        assert old.get_or_load("cfg:k3", load_k3) is None
    finally:
        old.close()
        if fresh is not None:
            fresh.close()
        d.stop()


def test_wrongtype_tag_counter_is_reset_and_bumped(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    ks = d.daemon.rules.keyspace
    try:
        tag = ks.tag("user-orders:9")
        r.rpush(tag, "junk")
        sql("INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (1, 9, 1, 10, 'new')")
        wait_until(lambda: r.xlen(ks.dead_letters) >= 1, what="the dead letter")
        (_, fields), = r.xrange(ks.dead_letters)
        assert fields[b"key"] == tag.encode() and b"wrongtype" in fields[b"reason"]
        assert r.type(tag) == b"string" and int(r.get(tag) or 0) > 0  # reset, then bumped past any old value
        sql("UPDATE orders SET status = 'paid' WHERE id = 1")
        wait_until(lambda: d.daemon.applied_batches >= 2, what="the stream goes on")
        assert r.xlen(ks.dead_letters) == 1 and "d" not in entry(r, f"{p}order:1")
    finally:
        d.stop()


def test_http_bind_failure_is_still_a_config_error(cfg: dict[str, Any], workdir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        daemon = DaemonProcess({**cfg, "http": {"port": busy.getsockname()[1]}}, workdir).start()
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 2
        assert "cannot serve HTTP" in daemon.log_path.read_text(errors="replace")


def test_idle_daemon_restores_the_registry_on_its_heartbeat(cfg: dict[str, Any],
                                                            private_redis: RedisServer) -> None:
    cfg = {**cfg, "redis": {**cfg["redis"], "url": private_redis.url},
           "daemon": {**cfg["daemon"], "heartbeat": 0.2}}
    d = DaemonThread(make_config(cfg)).start()
    try:
        registry = d.daemon.rules.keyspace.registry
        private_redis.stop()
        private_redis.start()  # empty, and no change will come to notice it
        r = redis.Redis.from_url(private_redis.url)
        wait_until(lambda: r.exists(registry), timeout=10, what="the registry restored while idle")
        assert d.daemon.metrics.redis_restores._value.get() >= 1
    finally:
        d.stop()
