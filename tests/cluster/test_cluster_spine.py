"""The spine on a real Redis Cluster: Postgres -> daemon -> entries on every master -> backplane -> a client's L1."""

from __future__ import annotations

import json
from typing import Any

from redis.cluster import RedisCluster

from cdcd.client import Cache, CacheOptions
from cdcd.devservers import RedisClusterServer
from tests.helpers import DaemonThread, entry, make_config, wait_until


def heard_all(cache: Cache, rc: RedisCluster, p: str) -> bool:
    """The cache's listener heard every message the daemon numbered so far (the applied state's ``seq``)."""
    state = {k.decode(): v.decode() for k, v in rc.hgetall(f"{p}#cdcd:applied").items()}
    if "run" not in state:  # nothing applied yet (an idle watermark announcement writes only its field)
        return False
    last = cache._subscriber.core.tracker.last.get(state["run"])
    return last is not None and last >= int(state["seq"])


def test_spine_on_cluster(ccfg: dict[str, Any], rc: RedisCluster, sql: Any,
                          redis_cluster: RedisClusterServer) -> None:
    p = ccfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(ccfg)).start()
    cache = Cache(rc, CacheOptions(prefix=p))
    try:
        assert cache.wait_subscribed(5)
        # inserts spread over the masters: entries land wherever their slot lives
        for i in range(1, 31):
            sql("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, 'n', 7)", (i, f"u{i}@x"))
        wait_until(lambda: all(entry(rc, f"{p}user:{i}").get("d") for i in range(1, 31)), what="30 users")
        owners = {redis_cluster.port_of_slot(rc.keyslot(f"{p}user:{i}")) for i in range(1, 31)}
        assert len(owners) == 3, owners  # the keys really are spread over the three masters
        v = json.loads(entry(rc, f"{p}user:1")["d"])
        assert v["email"] == "u1@x" and v["tenant_id"] == 7

        # the client reads what the daemon wrote (value + table tag counter on other nodes, one call)
        wait_until(lambda: heard_all(cache, rc, p), what="the inserts' messages heard")  # else one may drop L1
        assert cache.get("user:2")["email"] == "u2@x"
        assert "user:2" in cache.l1.data  # now in L1
        # update: the backplane (sharded pub/sub) reaches the client's L1
        sql("UPDATE users SET name = 'changed' WHERE id = 2")
        wait_until(lambda: "user:2" not in cache.l1.data, what="L1 dropped by the backplane")
        wait_until(lambda: json.loads(entry(rc, f"{p}user:2").get("d", "{}")).get("name") == "changed",
                   what="update applied")
        assert cache.get("user:2")["name"] == "changed"

        # delete: a tombstone; the client misses
        sql("DELETE FROM users WHERE id = 3")
        wait_until(lambda: "d" not in entry(rc, f"{p}user:3"), what="tombstone")
        assert cache.get("user:3") is None

        # the stale write-back race on a cluster: token taken, the row changes, the fill is refused
        calls = []

        def loader() -> dict[str, Any]:
            calls.append(1)
            if len(calls) == 1:  # the old row, read before the change below commits and is applied
                sql("UPDATE users SET name = 'newer' WHERE id = 4")
                wait_until(lambda: json.loads(entry(rc, f"{p}user:4").get("d", "{}")).get("name") == "newer",
                           what="update applied during the load")
                return {"id": 4, "name": "old"}
            return {"id": 4, "name": "fresh"}

        rc.delete(f"{p}user:4")  # a miss, so the loader runs
        assert cache.get_or_load("user:4", loader)["name"] == "old"  # the caller gets its value...
        assert json.loads(entry(rc, f"{p}user:4")["d"])["name"] == "newer"  # ...but L2 keeps the daemon's
        assert cache.stats.fills_refused >= 1

        # tags: a tag bump from the client invalidates entries carrying it, wherever they live
        cache.set("report:7", {"x": 1}, tags=["tenant:7"])
        assert cache.get("report:7") == {"x": 1}
        sql("UPDATE users SET name = 'again' WHERE id = 5")  # bumps tenant:7 (the rules' tag)
        wait_until(lambda: cache.get("report:7") is None, what="tag invalidation")

        # truncate: one bump of the table tag; every user entry (on every master) misses
        sql("TRUNCATE users CASCADE")
        wait_until(lambda: cache.get("user:6") is None, what="truncate reached the client")
        assert all(cache.get(f"user:{i}") is None for i in (1, 10, 20, 30))

        # single-flight lock across processes (SET NX PX on the lock's slot)
        from cdcd.client import EntryOptions

        got = cache.get_or_load("locked:1", lambda: {"v": 1}, options=EntryOptions(distributed_lock=True))
        assert got == {"v": 1}
        assert d.daemon.last_error is None or "Redis" not in d.daemon.last_error
    finally:
        cache.close()
        d.stop()


def test_classic_pubsub_on_cluster(ccfg: dict[str, Any], rc: RedisCluster, sql: Any) -> None:
    """``redis.pubsub: classic``: the daemon PUBLISHes (broadcast to every node), clients SUBSCRIBE anywhere."""
    ccfg["redis"]["pubsub"] = "classic"
    p = ccfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(ccfg)).start()
    a = Cache(rc, CacheOptions(prefix=p, cluster_pubsub="classic"))
    b = Cache(rc, CacheOptions(prefix=p, cluster_pubsub="classic"))
    try:
        assert a.wait_subscribed(5) and b.wait_subscribed(5)
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
        wait_until(lambda: entry(rc, f"{p}user:1").get("d") and heard_all(a, rc, p), what="insert applied, heard")
        assert a.get("user:1")["name"] == "a" and "user:1" in a.l1.data
        sql("UPDATE users SET name = 'b' WHERE id = 1")
        wait_until(lambda: "user:1" not in a.l1.data, what="the daemon's PUBLISH reached a's L1")
        assert a.get("user:1")["name"] == "b"
        b.set("report", {"r": 1})
        assert a.get("report") == {"r": 1}
        b.delete("report")  # the client's own announcement, classic too
        wait_until(lambda: "report" not in a.l1.data, what="b's PUBLISH reached a's L1")
    finally:
        a.close()
        b.close()
        d.stop()
