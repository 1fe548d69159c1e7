"""The asyncio cache keeps the same contract: single flight, the write-back race, backplane drops, Redis down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from cdcd.client import AsyncCache, CacheOptions, EntryOptions
from cdcd.devservers import RedisServer
from cdcd.keyspace import Keyspace
from tests.client.support import FakeDaemon, fields


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 30))


async def until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "") -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.002)
    return time.monotonic() - t0


def options(ks: Keyspace, **kw: Any) -> CacheOptions:
    return CacheOptions(require_registry=False, prefix=ks.prefix, entry=kw.pop("entry", EntryOptions(jitter=0.0)), **kw)


def test_100_tasks_on_a_cold_key_call_the_loader_once(redis_srv: RedisServer, ks: Keyspace) -> None:
    async def main() -> None:
        async with AsyncCache(redis_srv.url, options(ks, subscribe=False)) as cache:
            release = asyncio.Event()
            calls: list[int] = []

            async def loader() -> dict[str, int]:
                calls.append(1)
                await release.wait()
                return {"id": 1}

            tasks = [asyncio.create_task(cache.get_or_load("cold", loader)) for _ in range(100)]
            await until(lambda: cache.stats.coalesced == 99, what="99 callers coalesced")
            release.set()
            assert await asyncio.gather(*tasks) == [{"id": 1}] * 100
            assert calls == [1] and cache.stats.loader_calls == 1 and cache.stats.fills == 1
            # a cancelled caller does not cancel the load the others wait for
            release2 = asyncio.Event()

            async def loader2() -> str:
                await release2.wait()
                return "ok"

            first = asyncio.create_task(cache.get_or_load("k2", loader2))
            second = asyncio.create_task(cache.get_or_load("k2", loader2))
            await asyncio.sleep(0.01)
            first.cancel()
            release2.set()
            assert await second == "ok"

    run(main)


def test_write_back_race_and_cross_instance_drop(redis_srv: RedisServer, ks: Keyspace, daemon: FakeDaemon,
                                                 rds: redis.Redis) -> None:
    async def main() -> None:
        async with AsyncCache(redis_srv.url, options(ks)) as a, AsyncCache(redis_srv.url, options(ks)) as b:
            token_taken, applied = asyncio.Event(), asyncio.Event()

            async def loader() -> dict[str, str]:
                token_taken.set()
                await applied.wait()
                return {"status": "new"}

            task = asyncio.create_task(a.get_or_load("order:1", loader))
            await token_taken.wait()
            daemon.apply("order:1", b'{"status":"paid"}')
            applied.set()
            assert await task == {"status": "new"}
            assert fields(rds, ks.entry("order:1"))["d"] == '{"status":"paid"}'
            assert "order:1" not in a.l1.data and a.stats.fills_refused == 1
            # two instances: a daemon change drops the other's L1 copy within 100 ms
            assert await b.get_or_load("order:1", lambda: pytest.fail("L2")) == {"status": "paid"}
            assert await a.get_or_load("order:1", lambda: pytest.fail("L2")) == {"status": "paid"}
            daemon.apply("order:1", b'{"status":"shipped"}')
            took = max(await until(lambda: "order:1" not in a.l1.data, 2),
                       await until(lambda: "order:1" not in b.l1.data, 2))
            assert took < 1.0, took  # the backplane, not a TTL; latency is bench/e2e_latency.py's job
            assert await b.get("order:1") == {"status": "shipped"}
            # tags, and the app's own messages
            await a.get_or_load("r", lambda: "r1", tags=["tenant:1"])
            await b.get_or_load("r", lambda: "unused", tags=["tenant:1"])
            assert await a.invalidate_tag("tenant:1")
            await until(lambda: "r" not in b.l1.data, 1, "tag bump reached B")
            assert await b.get_or_load("r", lambda: "r2", tags=["tenant:1"]) == "r2"
            # a gap resets L1
            gaps = b.stats.backplane_gaps
            daemon.seq.seq += 5
            daemon.publish()
            await until(lambda: b.stats.backplane_gaps == gaps + 1, 1, "gap")

    run(main)


def test_redis_down_l1_serves_and_the_breaker_recovers(own_redis: RedisServer, ks: Keyspace) -> None:
    async def main() -> None:
        opts = options(ks, redis_timeout=0.2, breaker_failures=2, breaker_reset=0.3, backplane_ping=0.2,
                       entry=EntryOptions(ttl=0.3, jitter=0.0, early_refresh_beta=0, fail_safe_throttle=0.0))
        async with AsyncCache(own_redis.url, opts) as cache:
            assert await cache.wait_subscribed()
            await cache.get_or_load("k", lambda: "v")
            own_redis.stop()
            await asyncio.sleep(0.35)
            t0 = time.monotonic()
            assert await cache.get_or_load("k", lambda: "unused") == "v"  # fail-safe, Redis unreachable
            for i in range(10):
                assert await cache.get_or_load(f"m{i}", lambda: "loaded") == "loaded"
            # at most breaker_failures (2) timeouts of 0.2 s; without the breaker 11 calls would cost >= 2.2 s
            assert time.monotonic() - t0 < 0.2 * 2 + 1.0
            assert cache.breaker.state in ("open", "half-open") and cache.stats.fail_safe >= 1

            async def broken() -> str:
                raise RuntimeError("db down too")

            assert await cache.get("k") == "v"
            own_redis.start()
            await until(lambda: cache.breaker.state != "open", 2, "breaker half-open")
            await asyncio.sleep(0.05)
            assert await cache.get_or_load("fresh", lambda: "ok") == "ok"
            assert cache.breaker.state == "closed"
            await until(lambda: cache.stats.backplane_reconnects >= 1, 5, "listener re-subscribed")
            with pytest.raises(RuntimeError):
                await cache.get_or_load("never-seen", broken)

    run(main)


def test_async_decorator_and_timeouts(redis_srv: RedisServer, ks: Keyspace) -> None:
    async def main() -> None:
        async with AsyncCache(redis_srv.url, options(ks, subscribe=False)) as cache:
            calls: list[int] = []

            @cache.cached(key="order:{oid}", tags=["o"], ttl=60)
            async def get_order(oid: int) -> dict[str, int]:
                calls.append(oid)
                return {"id": oid}

            assert await get_order(9) == await get_order(9) == {"id": 9} and calls == [9]
            assert await get_order.invalidate(9)  # type: ignore[attr-defined]
            assert await get_order(9) == {"id": 9} and calls == [9, 9]
            with pytest.raises(TypeError):
                cache.cached(key="x")(lambda: 1)  # type: ignore[arg-type,return-value]

            async def slow() -> str:
                await asyncio.sleep(0.3)
                return "late"

            with pytest.raises(TimeoutError):
                await cache.get_or_load("slow", slow, options=EntryOptions(loader_hard_timeout=0.05))
            await until(lambda: "slow" in cache.l1.data, 2, "the slow load still filled")
            assert await cache.get("slow") == "late"

    run(main)
