"""No change is lost when the daemon is killed, when Redis goes away, or when the slot is dropped."""

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

from cdcd.devservers import RedisServer
from tests.helpers import DaemonProcess, DaemonThread, db_users, entry, make_config, stale_users, unique, wait_until


class Writer(threading.Thread):
    """Commits a known sequence: insert N users one per transaction, then rename each one."""

    def __init__(self, dsn: str, n: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.dsn, self.n, self.pause = dsn, n, pause
        self.committed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for i in range(1, self.n + 1):
                    conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, %s)",
                                 (i, f"u{i}@x", f"n{i}", i % 5))
                    self.committed += 1
                    time.sleep(self.pause)
                for i in range(1, self.n + 1):
                    conn.execute("UPDATE users SET name = %s, email = %s WHERE id = %s", (f"r{i}", f"w{i}@x", i))
                    self.committed += 1
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing(cfg: dict[str, Any], r: redis.Redis, app_db: str, workdir: Path) -> None:
    p = cfg["keyspace"]["prefix"]
    daemon = DaemonProcess(cfg, workdir).start()
    daemon.wait_ready()
    writer = Writer(app_db, 300, pause=0.01)
    writer.start()
    rng = random.Random(42)
    kills = 0
    try:
        while writer.is_alive() and kills < 4:
            time.sleep(rng.uniform(0.2, 0.6))
            daemon.kill()  # SIGKILL: no chance to ack or flush anything
            kills += 1
            time.sleep(rng.uniform(0.0, 0.3))  # more commits while it is down
            daemon = DaemonProcess(cfg, workdir).start()
            daemon.wait_ready()
        writer.join(60)
        assert writer.error is None and writer.committed == 600
        assert kills >= 2, "the writer finished before the daemon was killed twice: make it slower"
        expected = db_users(app_db)
        assert len(expected) == 300
        wait_until(lambda: not stale_users(r, p, expected), timeout=30, interval=0.2,
                   what="every user's cached row to equal the database")
        # the old e-mail keys of every renamed user hold tombstones, never a stale row
        assert all("d" not in entry(r, f"{p}user:email:u{i}@x") for i in range(1, 301))
    finally:
        daemon.stop()


@pytest.mark.slow
def test_sigterm_acks_and_exits_zero(cfg: dict[str, Any], r: redis.Redis, sql: Any, workdir: Path) -> None:
    p = cfg["keyspace"]["prefix"]
    daemon = DaemonProcess(cfg, workdir).start()
    daemon.wait_ready()
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
    wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="applied")
    version = int(entry(r, f"{p}user:1")["v"])
    assert daemon.terminate() == 0
    flushed = sql("SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
                  "WHERE slot_name = %s", (cfg["source"]["slot"],)).fetchone()[0]
    assert flushed >= version  # the checkpoint covers what Redis acknowledged
    assert any(e.get("event") == "stopped" for e in daemon.events())


def _redis_outage(cfg: dict[str, Any], app_db: str, server: RedisServer, restart: bool) -> None:
    cfg = {**cfg, "redis": {**cfg["redis"], "url": server.url}}
    p = cfg["keyspace"]["prefix"]
    r = redis.Redis.from_url(server.url)
    d = DaemonThread(make_config(cfg)).start()
    writer = Writer(app_db, 150, pause=0.01)
    try:
        writer.start()
        time.sleep(0.5)
        if restart:
            server.stop()  # Redis gone, and back empty: everything before is lost *from the cache*
        else:
            server.pause()  # the port accepts, nothing answers: a partition
        down_from = writer.committed
        time.sleep(2.5)
        assert writer.committed > down_from + 20, "writes continued while Redis was down"
        if restart:
            server.start()
        else:
            server.resume()
        writer.join(60)
        assert writer.error is None
        assert d.thread.is_alive() and d.error is None  # waited and retried; did not exit
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(r, p, expected), timeout=30, interval=0.2,
                   what="every user's cached row to equal the database after the outage")
        assert d.daemon.metrics.retries.labels("redis")._value.get() > 0
    finally:
        d.stop()


@pytest.mark.slow
def test_redis_restart_during_writes_loses_nothing(cfg: dict[str, Any], app_db: str,
                                                   private_redis: RedisServer) -> None:
    _redis_outage(cfg, app_db, private_redis, restart=True)


@pytest.mark.slow
def test_redis_partition_during_writes_loses_nothing(cfg: dict[str, Any], app_db: str,
                                                     private_redis: RedisServer) -> None:
    _redis_outage(cfg, app_db, private_redis, restart=False)


def test_dropped_slot_is_detected_and_everything_derived_is_invalidated(
        cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
    wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="applied")
    d.stop()
    epoch = int(r.get(f"{p}#tag:#table:public.users"))
    sql("SELECT pg_drop_replication_slot(%s)", (cfg["source"]["slot"],))
    sql("UPDATE users SET name = 'changed while no slot existed' WHERE id = 1")  # this change is lost for good
    d = DaemonThread(make_config(cfg)).start()
    try:
        # the daemon noticed, recreated the slot and bumped every table tag: entries derived from the
        # tables (the stale user:1 value records #table:public.users) no longer validate
        assert int(r.get(f"{p}#tag:#table:public.users")) > epoch
        assert d.daemon.metrics.errors.labels("slot_lost")._value.get() == 1
        snap = json.loads(entry(r, f"{p}user:1")["t"])
        assert int(snap["#table:public.users"]) < int(r.get(f"{p}#tag:#table:public.users"))
        sql("UPDATE users SET name = 'after' WHERE id = 1")  # and it streams again
        wait_until(lambda: json.loads(entry(r, f"{p}user:1").get("d", "{}")).get("name") == "after", what="resumed")
    finally:
        d.stop()


def test_second_daemon_on_the_same_slot_waits_instead_of_failing(cfg: dict[str, Any], r: redis.Redis,
                                                                 sql: Any) -> None:
    """The slot admits one consumer: a second daemon retries (standby) rather than crash-looping."""
    p = cfg["keyspace"]["prefix"]
    first = DaemonThread(make_config(cfg)).start()
    second = DaemonThread(make_config(cfg)).start(wait=False)
    try:
        wait_until(lambda: second.daemon.metrics.retries.labels("source")._value.get() > 0, what="standby retry")
        assert "in use" in (second.daemon.last_error or "")
        first.stop()
        assert second.daemon.ready.wait(15)
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (9, 'z@x', 'z', 1)")
        wait_until(lambda: entry(r, f"{p}user:9").get("d"), what="standby took over")
    finally:
        second.stop()


def test_unknown_slot_with_creation_off_is_a_clear_error(cfg: dict[str, Any]) -> None:
    from cdcd.sources.base import SourceError

    cfg["source"].update({"create_slot": False, "slot": unique("missing")})
    d = DaemonThread(make_config(cfg)).start(wait=False)
    d.thread.join(15)
    assert isinstance(d.error, SourceError)
    assert "does not exist and create_slot is off" in str(d.error)
    assert "pg_create_logical_replication_slot" in str(d.error)

