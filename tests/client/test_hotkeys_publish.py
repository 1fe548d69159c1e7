"""Hot keys published to a real Redis by the sync and async caches; a dead Redis costs no reader anything."""

from __future__ import annotations

import asyncio
import uuid

import redis

from cdcd.client import AsyncCache, Cache, CacheOptions, HotKeyOptions
from cdcd.devservers import RedisServer
from cdcd.hotset import read_fleet
from cdcd.keyspace import Keyspace
from tests.helpers import wait_until


def _opts(prefix: str, every: float = 0.2) -> CacheOptions:
    return CacheOptions(prefix=prefix, require_registry=False, subscribe=False,
                        hot_keys=HotKeyOptions(sample=1, top=3, publish_every=every))


def test_two_sync_processes_publish_and_the_fleet_merges(redis_srv: RedisServer, rds: redis.Redis) -> None:
    prefix = f"h{uuid.uuid4().hex[:8]}:"
    a, b = Cache(redis_srv.url, _opts(prefix)), Cache(redis_srv.url, _opts(prefix))
    try:
        for c in (a, b):
            for i in range(300):
                c.get_or_load("hot:1" if i % 3 else f"cold:{i}", lambda: 1)
        fleet = wait_until(lambda: (f := read_fleet(rds, Keyspace(prefix))).processes and len(f.processes) == 2
                           and f, what="both processes published")
        assert fleet.keys[0][0] == "hot:1" and fleet.keys[0][1] > 0
        assert rds.pttl(f"{prefix}#cdcd:hot:{a.run_id}") > 0  # a dead process's set expires
        assert a.hot_keys is not None and a.hot_keys.published >= 1
    finally:
        a.close()
        b.close()


def test_async_cache_publishes_after_start(redis_srv: RedisServer, rds: redis.Redis) -> None:
    prefix = f"h{uuid.uuid4().hex[:8]}:"

    async def main() -> list[tuple[str, float]]:
        async with AsyncCache(redis_srv.url, _opts(prefix, 0.1)) as c:
            for i in range(200):
                await c.get_or_load("hot:a" if i % 2 else f"cold:{i}", lambda: 1)
            assert await c.get("hot:a") == 1  # the wrapped get still answers
            for _ in range(100):
                fleet = read_fleet(rds, Keyspace(prefix))
                if fleet.keys:
                    return fleet.keys
                await asyncio.sleep(0.05)
        return []

    keys = asyncio.run(main())
    assert keys and keys[0][0] == "hot:a"


def test_publish_failure_is_counted_and_reads_go_on(own_redis: RedisServer) -> None:
    prefix = f"h{uuid.uuid4().hex[:8]}:"
    c = Cache(own_redis.url, _opts(prefix, 3600))
    try:
        assert c.get_or_load("k:1", lambda: 7) == 7
        own_redis.stop()
        assert c.get_or_load("k:1", lambda: 8) == 7  # L1 hit, counted
        hot = c.hot_keys
        assert hot is not None and not hot.publish_now(c.link.call_checked)
        assert hot.publish_errors == 1 and hot.last_window and hot.last_window[0][0] == "k:1"
    finally:
        c.close()
