"""The client's entry points on a real Redis Cluster, without a daemon: AsyncCache over redis.asyncio's
cluster client, a ``redis+cluster://`` URL, the decorators, FillGuard, and two processes' L1s kept in step
by the sharded backplane."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from cdcd.client import AsyncCache, Cache, CacheOptions, EntryOptions
from cdcd.client.cluster_link import AsyncClusterLink, ClusterLink
from cdcd.client.connect import cluster_url
from cdcd.devservers import RedisClusterServer
from cdcd.fillguard import FillGuard
from cdcd.keyspace import Keyspace
from tests.helpers import unique, wait_until


def _opts(prefix: str) -> CacheOptions:
    return CacheOptions(prefix=prefix, require_registry=False)  # no daemon serves these prefixes


def test_cluster_url_and_two_processes(redis_cluster: RedisClusterServer, rc: RedisCluster) -> None:
    p = unique("c") + ":"
    url = redis_cluster.url.replace("redis://", "redis+cluster://")
    assert cluster_url(url) == redis_cluster.url and cluster_url(redis_cluster.url) is None
    a = Cache(url, _opts(p))
    b = Cache(rc, _opts(p))
    try:
        assert isinstance(a.link, ClusterLink) and a.wait_subscribed(5) and b.wait_subscribed(5)
        calls: list[int] = []

        @a.cached(key="item:{n}", tags=["group:{g}"], ttl=60)
        def load(n: int, g: int) -> dict[str, int]:
            calls.append(n)
            return {"n": n, "g": g}

        for n in range(20):  # keys over every master, tag counters elsewhere: each read spans nodes
            assert load(n, n % 2) == {"n": n, "g": n % 2}
        assert len(calls) == 20
        assert b.get("item:3") == {"n": 3, "g": 1}  # b reads a's fill from L2
        assert load(3, 1) == {"n": 3, "g": 1} and len(calls) == 20  # a's L1
        # a's tag bump reaches b's L1 through the sharded backplane, and L2 entries of the tag miss
        assert a.invalidate_tag("group:1")
        wait_until(lambda: "item:3" not in b.l1.data, what="b's L1 dropped by the tag")
        assert b.get("item:3") is None and b.get("item:4") == {"n": 4, "g": 0}
        assert load.invalidate(4, 0)
        wait_until(lambda: "item:4" not in b.l1.data, what="b's L1 dropped by the delete")
        assert b.get("item:4") is None
        # the cross-process single-flight lock works on the lock key's own slot
        got = b.get_or_load("locked", lambda: {"x": 1}, options=EntryOptions(distributed_lock=True))
        assert got == {"x": 1} and a.get("locked") == {"x": 1}
    finally:
        a.close()
        b.close()


def test_async_cache_on_cluster(redis_cluster: RedisClusterServer) -> None:
    p = unique("c") + ":"

    async def main() -> None:
        client = AsyncRedisCluster.from_url(redis_cluster.url)
        cache = AsyncCache(client, _opts(p))
        other = AsyncCache(redis_cluster.url.replace("redis://", "redis+cluster://"), _opts(p))
        try:
            await cache.start()
            await other.start()
            assert await cache.wait_subscribed(5) and await other.wait_subscribed(5)

            async def loader() -> dict[str, int]:
                return {"v": 1}

            for n in range(10):
                assert await cache.get_or_load(f"k:{n}", loader, tags=[f"t:{n % 3}"]) == {"v": 1}
            assert await other.get("k:5") == {"v": 1}
            assert await other.invalidate_tag("t:2")  # k:2, k:5, k:8
            assert await other.get("k:5") is None
            for _ in range(500):  # the listener runs on this loop: poll without blocking it
                if "k:5" not in cache.l1.data:
                    break
                await asyncio.sleep(0.01)
            assert "k:5" not in cache.l1.data, "backplane did not reach the async cache"
            assert await cache.get("k:5") is None and await cache.get("k:4") == {"v": 1}
            assert isinstance(cache.link, AsyncClusterLink) and cache.link._ready  # the link's own batches
            # the slot of k:1 moves to another master: the link's slot map is stale, MOVED is followed
            slot = client.keyslot(f"{p}k:1")
            owner = redis_cluster.port_of_slot(slot)
            target = next(m for m in redis_cluster.master_ports() if m != owner)
            assert redis_cluster.migrate_slot(slot, target) >= 1
            cache.l1.clear()
            assert await cache.get("k:1") == {"v": 1}
            assert await cache.get_or_load("k:1", loader) == {"v": 1}
        finally:
            await cache.close()
            await other.close()
            await client.aclose()

    asyncio.run(main())


def test_fillguard_on_cluster(rc: RedisCluster) -> None:
    ks = Keyspace(unique("g") + ":")
    guard = FillGuard(rc, ks)
    rc.script_flush()  # every primary: the guard loads its scripts on NOSCRIPT
    token = guard.read("row:1")
    assert not token.hit
    stale = guard.read("row:2")
    guard.invalidate("row:2")  # a change between token and fill
    assert guard.fill(token, json.dumps({"a": 1}).encode(), ttl=30)
    assert not guard.fill(stale, b"old", ttl=30)  # refused: the key moved on
    assert json.loads(guard.read("row:1").value or b"") == {"a": 1}
