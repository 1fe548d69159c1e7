"""Faults of a real Redis Cluster while the daemon applies a steady stream of changes and a client reads.

After each, every cached entry must equal the database (nothing lost, nothing stale) and the client's L1
must have been reset where the backplane could have lost messages (its shard failed over or moved).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest
from redis.cluster import RedisCluster

from cdcd.client import Cache, CacheOptions
from cdcd.devservers import RedisClusterServer
from tests.helpers import DaemonThread, entry, make_config, wait_until

N = 40


class _Load(threading.Thread):
    """A background load the faults happen under: runs until ``stop``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


class Writer(_Load):
    """Updates users 1..N round robin, as fast as one connection goes, until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.count = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop_event.is_set():
                i = self.count % N + 1
                conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"n{self.count}", i))
                self.count += 1
                time.sleep(0.002)


class Reader(_Load):
    """Reads users through the cache all along (L2 through the cluster link: redirects, dead nodes)."""

    def __init__(self, cache: Cache) -> None:
        super().__init__()
        self.cache = cache
        self.reads = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.cache.get(f"user:{self.reads % N + 1}")
            self.reads += 1
            if self.reads % 50 == 0:
                self.cache.l1.clear()  # so reads keep going to L2


def _db_names(sql: Any) -> dict[int, str]:
    return {i: n for i, n in sql("SELECT id, name FROM users").fetchall()}


def _converged(rc: RedisCluster, p: str, cache: Cache, db: dict[int, str]) -> bool:
    for i, name in db.items():
        d = entry(rc, f"{p}user:{i}").get("d")
        if d is None or json.loads(d)["name"] != name:
            return False
        got = cache.get(f"user:{i}")
        if got is None or got["name"] != name:
            return False
    return True


def _setup(ccfg: dict[str, Any], sql: Any, rc: RedisCluster) -> tuple[DaemonThread, Cache, str]:
    p = ccfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(ccfg)).start()
    for i in range(1, N + 1):
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, 'n', %s)", (i, f"u{i}@x", i % 3))
    cache = Cache(rc, CacheOptions(prefix=p, redis_timeout=1.0, breaker_reset=0.2))
    assert cache.wait_subscribed(5)
    wait_until(lambda: all(entry(rc, f"{p}user:{i}").get("d") for i in range(1, N + 1)), what="initial rows")
    for i in range(1, N + 1):  # fill L1: what a lost backplane message would leave stale
        assert cache.get(f"user:{i}") is not None
    return d, cache, p


@pytest.mark.slow
def test_master_failover_under_writes(ccfg: dict[str, Any], rc: RedisCluster, sql: Any, app_db: str,
                                      redis_cluster: RedisClusterServer) -> None:
    ccfg["redis"]["wait_replicas"] = 1  # an acknowledged batch is on a replica too: a failover cannot lose it
    d, cache, p = _setup(ccfg, sql, rc)
    writer, reader = Writer(app_db), Reader(cache)
    victim = redis_cluster.port_of_slot(rc.keyslot(f"{p}#cdcd:bp"))  # the backplane's shard: the hard case
    reconnects, resets = cache.stats.backplane_reconnects, cache.stats.l1_resets
    try:
        writer.start()
        reader.start()
        wait_until(lambda: writer.count > 50, what="writes flowing")
        redis_cluster.kill_node(victim)
        # its replica is promoted after the node timeout; the daemon retries meanwhile, the writes go on
        wait_until(lambda: victim not in redis_cluster.master_ports(), timeout=20, interval=0.1,
                   what="replica promoted")
        at_failover = writer.count
        redis_cluster.restart_node(victim)  # rejoins as a replica of its successor
        redis_cluster.wait_ok()
        wait_until(lambda: writer.count > at_failover + 100, timeout=20, what="writes after the failover")
        writer.stop()
        reader.stop()
        assert reader.reads > 100
        db = _db_names(sql)
        wait_until(lambda: _converged(rc, p, cache, db), timeout=30, interval=0.1, what="cache equals the database")
        assert d.daemon.metrics.retries.labels("redis")._value.get() >= 1  # batches failed and were retried
        assert cache.stats.backplane_reconnects > reconnects  # resubscribed to the new owner of the shard...
        assert cache.stats.l1_resets > resets  # ...and dropped L1, which may have missed messages meanwhile
        # every update acknowledged (Redis may hold a batch before the daemon has settled it: wait for that)
        wait_until(lambda: d.daemon.metrics.changes.labels("public.users", "u")._value.get() >= writer.count,
                   timeout=20, what="every update acknowledged")
    finally:
        writer.stop()
        reader.stop()
        cache.close()
        d.stop()
        if victim not in redis_cluster.alive():
            redis_cluster.restart_node(victim)
        redis_cluster.wait_ok()


@pytest.mark.slow
def test_resharding_under_writes(ccfg: dict[str, Any], rc: RedisCluster, sql: Any, app_db: str,
                                 redis_cluster: RedisClusterServer) -> None:
    d, cache, p = _setup(ccfg, sql, rc)
    writer, reader = Writer(app_db), Reader(cache)
    channel_slot = rc.keyslot(f"{p}#cdcd:bp")
    slots = list(dict.fromkeys([channel_slot, *(rc.keyslot(f"{p}user:{i}") for i in range(1, 9))]))
    reconnects = cache.stats.backplane_reconnects
    try:
        writer.start()
        reader.start()
        wait_until(lambda: writer.count > 50, what="writes flowing")
        moved = 0
        for slot in slots:  # each to another master, in batches of one key: clients meet ASK and MOVED
            owner = redis_cluster.port_of_slot(slot)
            target = next(m for m in redis_cluster.master_ports() if m != owner)
            moved += redis_cluster.migrate_slot(slot, target, batch=1, pause=0.01)
            assert redis_cluster.port_of_slot(slot) == target
        assert moved >= len(slots) - 1  # the user keys moved with their slots
        at_end = writer.count
        wait_until(lambda: writer.count > at_end + 100, timeout=20, what="writes after the resharding")
        writer.stop()
        reader.stop()
        assert reader.reads > 100
        db = _db_names(sql)
        wait_until(lambda: _converged(rc, p, cache, db), timeout=30, interval=0.1, what="cache equals the database")
        assert cache.stats.backplane_reconnects > reconnects  # the channel's slot moved: sunsubscribe, resubscribe
        # every update acknowledged (Redis may hold a batch before the daemon has settled it: wait for that)
        wait_until(lambda: d.daemon.metrics.changes.labels("public.users", "u")._value.get() >= writer.count,
                   timeout=20, what="every update acknowledged")
    finally:
        writer.stop()
        reader.stop()
        cache.close()
        d.stop()
        redis_cluster.wait_ok()


def test_wait_replicas_holds_the_ack_while_a_master_has_no_replica(
        ccfg: dict[str, Any], rc: RedisCluster,
        sql: Any, redis_cluster: RedisClusterServer) -> None:
    """With ``wait_replicas: 1`` a batch whose master cannot replicate it is not acknowledged: the applied
    position (and so the slot's) stays behind and nothing is announced, until a replica is back."""
    ccfg["redis"]["wait_replicas"] = 1
    p = ccfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(ccfg)).start()
    master = redis_cluster.port_of_slot(rc.keyslot(f"{p}user:1"))
    (replica,) = redis_cluster.replica_ports(master)
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (2, 'b@x', 'b', 1)")
        applied = wait_until(lambda: int(rc.hget(f"{p}#cdcd:applied", "version") or 0),
                             what="first change applied and acknowledged")
        retries = d.daemon.metrics.retries.labels("redis")._value.get()
        redis_cluster.kill_node(replica)
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
        wait_until(lambda: d.daemon.metrics.retries.labels("redis")._value.get() >= retries + 2, timeout=15,
                   what="the batch refused for want of a replica, twice")
        assert entry(rc, f"{p}user:1").get("d")  # the master holds it (versioned: the retries are harmless)...
        assert int(rc.hget(f"{p}#cdcd:applied", "version") or 0) == applied  # ...but it was not acknowledged
        redis_cluster.restart_node(replica)
        redis_cluster.wait_ok()
        wait_until(lambda: int(rc.hget(f"{p}#cdcd:applied", "version") or 0) > applied, timeout=20,
                   what="acknowledged once the replica is back")
    finally:
        d.stop()
        if replica not in redis_cluster.alive():
            redis_cluster.restart_node(replica)
        redis_cluster.wait_ok()
