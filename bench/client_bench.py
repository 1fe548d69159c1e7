"""Client read throughput: cdcd.client vs cashews, aiocache, dogpile.cache and raw redis-py, one run.

    .venv/bin/python bench/client_bench.py [--n 200000] [--l2-n 20000]

Prints gets/s for L1 hits (in-process) and L2 hits (Redis on loopback, one key, value ~100 bytes).
Peers are bench-only dependencies: pip install cashews aiocache dogpile.cache
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from cdcd.client import AsyncCache, Cache, CacheOptions, EntryOptions
from cdcd.devservers import redis_server

VALUE = {"id": 42, "email": "ada@example.com", "name": "Ada Lovelace", "tenant_id": 7, "active": True}


def rate_sync(fn: Callable[[], Any], n: int) -> float:
    for _ in range(min(n // 10, 1000)):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def rate_async(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    async def run() -> float:
        for _ in range(min(n // 10, 1000)):
            await fn()
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        return n / (time.perf_counter() - t0)

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--l2-n", type=int, default=20_000)
    args = ap.parse_args()
    rows: list[tuple[str, str, float]] = []
    with redis_server() as rs:
        r = redis.Redis.from_url(rs.url)
        # ---- L1 hits
        cache = Cache(rs.url, CacheOptions(prefix="b:", subscribe=False, entry=EntryOptions(ttl=3600, jitter=0)))
        cache.get_or_load("user:42", lambda: VALUE)
        rows.append(("L1 hit", "cdcd Cache.get (sync)", rate_sync(lambda: cache.get("user:42"), args.n)))
        rows.append(("L1 hit", "cdcd Cache.get_or_load (sync)",
                     rate_sync(lambda: cache.get_or_load("user:42", lambda: VALUE), args.n)))

        from dogpile.cache import make_region

        region = make_region().configure("dogpile.cache.memory", expiration_time=3600)
        region.set("user:42", VALUE)
        rows.append(("L1 hit", "dogpile.cache memory get (sync)", rate_sync(lambda: region.get("user:42"), args.n)))
        rows.append(("L1 hit", "dogpile.cache get_or_create (sync)",
                     rate_sync(lambda: region.get_or_create("user:42", lambda: VALUE), args.n)))

        async def cdcd_async() -> float:
            ac = AsyncCache(rs.url, CacheOptions(prefix="b:", subscribe=False))
            await ac.get_or_load("user:42", lambda: VALUE)
            n = args.n
            t0 = time.perf_counter()
            for _ in range(n):
                await ac.get("user:42")
            out = n / (time.perf_counter() - t0)
            await ac.close()
            return out

        rows.append(("L1 hit", "cdcd AsyncCache.get (async)", asyncio.run(cdcd_async())))

        from aiocache import SimpleMemoryCache

        aio = SimpleMemoryCache()
        asyncio.run(aio.set("user:42", VALUE))
        rows.append(("L1 hit", "aiocache SimpleMemoryCache.get (async)", rate_async(lambda: aio.get("user:42"), args.n)))

        from cashews import Cache as CashewsCache

        cw = CashewsCache()
        cw.setup("mem://")
        asyncio.run(cw.set("user:42", VALUE, expire=3600))
        rows.append(("L1 hit", "cashews mem:// get (async)", rate_async(lambda: cw.get("user:42"), args.n)))

        # ---- L2 hits (every call goes to Redis)
        l2 = Cache(rs.url, CacheOptions(prefix="b:", subscribe=False, l1_max_entries=0))
        rows.append(("L2 hit", "cdcd Cache.get, L1 off (HMGET)", rate_sync(lambda: l2.get("user:42"),
                                                                                   args.l2_n)))
        r.set("raw:user:42", cache.serializer.dumps(VALUE))
        rows.append(("L2 hit", "raw redis-py GET + json.loads",
                     rate_sync(lambda: cache.serializer.loads(r.get("raw:user:42")), args.l2_n)))  # type: ignore[arg-type]
        rows.append(("L2 hit", "raw redis-py GET", rate_sync(lambda: r.get("raw:user:42"), args.l2_n)))
        region2 = make_region().configure("dogpile.cache.redis", expiration_time=3600,
                                          arguments={"host": "127.0.0.1", "port": rs.port})
        region2.set("user:42", VALUE)
        rows.append(("L2 hit", "dogpile.cache redis get", rate_sync(lambda: region2.get("user:42"), args.l2_n)))
        cache.close()
        l2.close()

    print(f"{'tier':7} {'implementation':44} {'gets/s':>12} {'µs/get':>8}")
    for tier, name, rate in rows:
        print(f"{tier:7} {name:44} {rate:12,.0f} {1e6 / rate:8.2f}")


if __name__ == "__main__":
    main()
