"""The client library against a real Redis (and, where it is about CDC, real Postgres and the daemon)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from typing import Any

import pytest
import redis

from cdcd.backplane import Message
from cdcd.client import NOT_FOUND, AsyncCache, Cache, CacheOptions, EntryOptions
from cdcd.client.protocol import xfetch_due
from cdcd.devservers import RedisServer
from cdcd.keyspace import SCRIPTS, Keyspace, run_script
from tests.helpers import DaemonThread, entry, make_config, unique, wait_until


@pytest.fixture
def prefix() -> str:
    return unique("c") + ":"


def make(url: str, prefix: str, **kw: Any) -> Cache:
    entry_opts = kw.pop("entry", EntryOptions(jitter=0.0))
    return Cache(url, CacheOptions(require_registry=False, prefix=prefix, entry=entry_opts, **kw))


def daemon_apply(r: redis.Redis, prefix: str, key: str, version: int, value: bytes | None = None) -> None:
    """What the daemon does for a change: a versioned write (tombstone or value)."""
    run_script(r, SCRIPTS["apply"], [prefix + key], [version, "t" if value is None else "v", 60_000,
                                                    value or b"", ""])


def test_l1_then_l2_then_loader(redis_server: RedisServer, r: redis.Redis, prefix: str) -> None:
    calls = []
    with make(redis_server.url, prefix, subscribe=False) as a, make(redis_server.url, prefix, subscribe=False) as b:
        assert a.get_or_load("user:1", lambda: calls.append(1) or {"id": 1}) == {"id": 1}
        assert a.get_or_load("user:1", lambda: calls.append(1) or {"id": 1}) == {"id": 1}
        assert len(calls) == 1 and a.stats.l1_hits == 1 and a.stats.fills == 1
        assert json.loads(entry(r, prefix + "user:1")["d"]) == {"id": 1}
        assert b.get_or_load("user:1", lambda: calls.append(1) or {"id": 2}) == {"id": 1}  # L2 hit
        assert len(calls) == 1 and b.stats.l2_hits == 1
        assert b.get("user:1") == {"id": 1} and b.get("nope", "dflt") == "dflt"
        # TTL jitter: many entries written with jitter 0.1 get different TTLs around the nominal one
        c = make(redis_server.url, prefix, subscribe=False, entry=EntryOptions(ttl=100, jitter=0.1))
        for i in range(20):
            c.get_or_load(f"j:{i}", lambda: 1)
        ttls = {r.pttl(f"{prefix}j:{i}") for i in range(20)}
        assert len(ttls) > 10 and all(89_000 < t <= 110_000 for t in ttls)
        c.close()


def test_single_flight_threads_and_asyncio(redis_server: RedisServer, prefix: str) -> None:
    calls = []

    def slow() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "v"

    with make(redis_server.url, prefix, subscribe=False) as cache:
        barrier = threading.Barrier(100)
        results: list[Any] = []

        def call() -> None:
            barrier.wait()
            results.append(cache.get_or_load("cold", slow))

        threads = [threading.Thread(target=call) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == ["v"] * 100 and len(calls) == 1
        assert cache.stats.coalesced + cache.stats.l1_hits == 99

    acalls = []

    async def aslow() -> str:
        acalls.append(1)
        await asyncio.sleep(0.2)
        return "w"

    async def main() -> list[Any]:
        cache = AsyncCache(redis_server.url, CacheOptions(require_registry=False, prefix=prefix, subscribe=False))
        try:
            return await asyncio.gather(*(cache.get_or_load("acold", aslow) for _ in range(100)))
        finally:
            await cache.close()

    assert asyncio.run(main()) == ["w"] * 100 and len(acalls) == 1


def test_fail_safe_serves_stale_within_max_age_then_errors(redis_server: RedisServer, prefix: str) -> None:
    opts = EntryOptions(ttl=0.2, jitter=0.0, fail_safe_max_age=0.6, early_refresh_beta=0)
    with make(redis_server.url, prefix, subscribe=False, entry=opts) as cache:
        assert cache.get_or_load("k", lambda: "good") == "good"
        time.sleep(0.3)  # expired in L1 and L2

        def broken() -> str:
            raise RuntimeError("database down")

        assert cache.get_or_load("k", broken) == "good"  # fail-safe
        assert cache.stats.fail_safe == 1 and cache.stats.loader_errors == 1
        time.sleep(0.6)  # past the fail-safe window
        with pytest.raises(RuntimeError, match="database down"):
            cache.get_or_load("k", broken)
        # errors are never cached: a working loader is called at once
        assert cache.get_or_load("k", lambda: "back") == "back"


def test_soft_timeout_serves_stale_and_lets_the_loader_finish(redis_server: RedisServer, r: redis.Redis,
                                                             prefix: str) -> None:
    opts = EntryOptions(ttl=0.2, jitter=0.0, loader_soft_timeout=0.05, early_refresh_beta=0)
    with make(redis_server.url, prefix, subscribe=False, entry=opts.merged(ttl=30)) as cache:
        cache.get_or_load("k", lambda: "old", options=opts)
        time.sleep(0.3)

        def slow() -> str:
            time.sleep(1.5)
            return "new"

        t0 = time.monotonic()
        assert cache.get_or_load("k", slow, options=opts) == "old"
        # the soft timeout (0.05 s) answered, not the 1.5 s loader; the slack is for a busy machine
        assert time.monotonic() - t0 < 1.0 and cache.stats.loader_timeouts == 1
        wait_until(lambda: (entry(r, prefix + "k").get("d") or "") == '"new"', what="late loader filled L2")


def test_stale_while_revalidate(redis_server: RedisServer, prefix: str) -> None:
    opts = EntryOptions(ttl=5, soft_ttl=0.1, jitter=0.0, early_refresh_beta=0)
    with make(redis_server.url, prefix, subscribe=False, entry=opts) as cache:
        n = [0]

        def load() -> int:
            n[0] += 1
            if n[0] > 1:
                time.sleep(1.0)  # a slow refresh: the stale value must not wait for it
            return n[0]

        assert cache.get_or_load("k", load) == 1
        time.sleep(0.15)
        t0 = time.monotonic()
        assert cache.get_or_load("k", load) == 1  # stale, at once
        assert time.monotonic() - t0 < 0.5  # not the 1 s refresh; the slack is for a busy machine
        assert cache.get_or_load("k", load) == 1  # one refresh only
        wait_until(lambda: cache.get_or_load("k", load) == 2, what="background refresh")
        assert n[0] == 2 and cache.stats.stale_served >= 2 and cache.stats.refreshes == 1


def test_negative_caching_goes_through_the_guard(redis_server: RedisServer, r: redis.Redis, prefix: str) -> None:
    with make(redis_server.url, prefix, subscribe=False) as cache:
        assert cache.get_or_load("user:9", lambda: None) is None
        assert entry(r, prefix + "user:9").get("n") == "1" and cache.stats.negative_fills == 1
        assert cache.get_or_load("user:9", lambda: pytest.fail("negative entry not used")) is None
        assert cache.get_or_load("user:8", lambda: NOT_FOUND) is None
        # an insert between token and fill wins over the "not found"
        gate = threading.Event()

        def loader() -> Any:
            gate.wait(5)
            return None

        t = threading.Thread(target=lambda: cache.get_or_load("user:7", loader))
        t.start()
        wait_until(lambda: entry(r, prefix + "user:7"), what="lease taken")
        daemon_apply(r, prefix, "user:7", 100)
        gate.set()
        t.join()
        assert "n" not in entry(r, prefix + "user:7") and cache.stats.fills_refused == 1


def test_write_back_race_through_get_or_load(redis_server: RedisServer, r: redis.Redis, prefix: str) -> None:
    """The loader read the old row; the daemon applied a newer change; the old row lands nowhere."""
    with make(redis_server.url, prefix, subscribe=False) as cache:
        read_done, change_applied = threading.Event(), threading.Event()

        def loader() -> dict[str, str]:
            row = {"status": "old"}  # read from the database before the commit
            read_done.set()
            change_applied.wait(5)
            return row

        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(cache.get_or_load("order:1", loader)))
        t.start()
        read_done.wait(5)
        daemon_apply(r, prefix, "order:1", 200)  # B's commit, applied by the daemon
        change_applied.set()
        t.join()
        assert out == [{"status": "old"}]  # the caller still gets its value...
        assert "d" not in entry(r, prefix + "order:1")  # ...but L2 keeps the newer state
        assert "order:1" not in cache.l1.data  # and L1 keeps no copy of the stale row
        assert cache.stats.fills_refused == 1
        assert cache.get_or_load("order:1", lambda: {"status": "new"}) == {"status": "new"}


def test_backplane_gap_and_new_daemon_run_reset_l1(redis_server: RedisServer, r: redis.Redis, prefix: str) -> None:
    with make(redis_server.url, prefix) as cache:
        assert cache.wait_subscribed()
        channel = Keyspace(prefix).channel

        def publish(seq: int, run: str = "daemon-1", keys: tuple[str, ...] = ()) -> None:
            r.publish(channel, Message("cdcd", run, seq, "1", list(keys), [], time.time()).encode())

        publish(1)
        wait_until(lambda: cache.stats.backplane_messages == 1)
        cache.get_or_load("a", lambda: 1)
        cache.get_or_load("b", lambda: 2)
        resets = cache.stats.l1_resets
        publish(2, keys=(prefix + "a",))  # in sequence: drops only a
        wait_until(lambda: "a" not in cache.l1.data, what="a dropped")
        assert cache.l1.data["b"].hard > 0 and cache.stats.l1_resets == resets
        publish(4)  # seq 3 lost: everything in L1 is suspect
        wait_until(lambda: cache.stats.backplane_gaps == 1, what="gap detected")
        assert cache.l1.data["b"].hard == 0 and cache.stats.l1_resets == resets + 1
        cache.get_or_load("b", lambda: 3)
        publish(1, run="daemon-2")  # a restarted daemon
        wait_until(lambda: cache.stats.l1_resets == resets + 2, what="new run detected")
        assert cache.l1.data["b"].hard == 0


def test_tags_and_cross_process_invalidation(redis_server: RedisServer, r: redis.Redis, prefix: str) -> None:
    with make(redis_server.url, prefix) as a, make(redis_server.url, prefix) as b:
        assert a.wait_subscribed() and b.wait_subscribed()
        for c in (a, b):
            assert c.get_or_load("report:7", lambda: "r7", tags=["tenant:7"]) == "r7"
        assert b.stats.l2_hits == 1
        a.invalidate_tag("tenant:7")
        assert a.get_or_load("report:7", lambda: "r7b", tags=["tenant:7"]) == "r7b"  # O(1) miss in A
        wait_until(lambda: "report:7" not in b.l1.data, timeout=2, what="B's L1 dropped via the backplane")
        assert b.get_or_load("report:7", lambda: "unused", tags=["tenant:7"]) == "r7b"  # refilled by A
        # set/delete from one process drop the other's L1 copy
        b.get_or_load("user:1", lambda: "u1")
        a.set("user:1", "u1-new")
        wait_until(lambda: b.get_or_load("user:1", lambda: "x") == "u1-new", timeout=2, what="set propagated")
        a.delete("user:1")
        wait_until(lambda: "user:1" not in b.l1.data, timeout=2, what="delete propagated")


def test_table_tag_from_the_registry_makes_truncate_o1(redis_server: RedisServer, r: redis.Redis,
                                                       prefix: str) -> None:
    ks = Keyspace(prefix)
    r.set(ks.registry, json.dumps({"tables": {"public.users": {"keys": ["user:{id}"], "tags": ["tenant:{t}"]}}}))
    with make(redis_server.url, prefix, subscribe=False) as cache:
        cache.get_or_load("user:1", lambda: "a")
        cache.get_or_load("tenant-report", lambda: "b", tags=["tenant:3"])
        assert set(json.loads(entry(r, prefix + "user:1")["t"])) == {"#table:public.users"}
        assert set(json.loads(entry(r, prefix + "tenant-report")["t"])) == {"tenant:3", "#table:public.users"}
        run_script(r, SCRIPTS["bump_tag"], [ks.tag("#table:public.users")], [])  # what TRUNCATE does
    with make(redis_server.url, prefix, subscribe=False) as fresh:
        assert fresh.get_or_load("user:1", lambda: "after truncate") == "after truncate"
        assert fresh.get_or_load("tenant-report", lambda: "b2", tags=["tenant:3"]) == "b2"


def test_redis_down_l1_serves_calls_stay_bounded_breaker_recovers(private_redis: RedisServer, prefix: str) -> None:
    with make(private_redis.url, prefix, redis_timeout=0.2, breaker_failures=2, breaker_reset=0.5) as cache:
        assert cache.wait_subscribed()
        cache.get_or_load("k", lambda: "v")
        private_redis.stop()
        t0 = time.monotonic()
        assert cache.get_or_load("k", lambda: "unused") == "v"  # L1
        for i in range(5):  # misses: loader answers; Redis errors cost a bounded time, then none
            assert cache.get_or_load(f"m{i}", lambda: "loaded") == "loaded"
        assert time.monotonic() - t0 < 2.0
        assert cache.breaker.state in ("open", "half-open") and cache.stats.breaker_open >= 1
        private_redis.start()
        time.sleep(0.6)
        wait_until(lambda: cache.get_or_load(f"after{time.monotonic()}", lambda: "ok") == "ok"
                   and cache.breaker.state == "closed", timeout=5, what="breaker closed again")
        assert cache.wait_subscribed(5)  # the listener reconnected (and reset L1 on the way)


def test_xfetch_probability_matches_the_paper() -> None:
    rng = random.Random(1234)
    delta, beta = 0.1, 1.0
    for remaining in (0.05, 0.1, 0.2, 0.4):
        n = 50_000
        hits = sum(xfetch_due(delta, beta, remaining, rng.random()) for _ in range(n))
        expected = math.exp(-remaining / (delta * beta))
        assert abs(hits / n - expected) < 0.01, (remaining, hits / n, expected)


def test_hot_key_refreshes_before_expiry(redis_server: RedisServer, prefix: str) -> None:
    opts = EntryOptions(ttl=0.6, jitter=0.0, early_refresh_beta=1.0)
    with Cache(redis_server.url, CacheOptions(require_registry=False, prefix=prefix, subscribe=False, entry=opts),
               rng=random.Random(7)) as cache:
        loads: list[float] = []

        def load() -> float:
            time.sleep(0.1)  # delta = 0.1 s
            loads.append(time.monotonic())
            return loads[-1]

        cache.get_or_load("hot", load)
        expiry = cache.l1.data["hot"].soft
        while time.monotonic() < expiry and len(loads) < 2:
            cache.get_or_load("hot", load)
            time.sleep(0.001)
        wait_until(lambda: len(loads) >= 2, timeout=2)
        assert cache.stats.early_refreshes >= 1
        assert loads[1] - 0.1 < expiry  # the refresh started before the entry expired


def test_decorators(redis_server: RedisServer, prefix: str) -> None:
    with make(redis_server.url, prefix, subscribe=False) as cache:
        calls = []

        @cache.cached(key="user:{user_id}", tags=["tenant:{tenant}"], ttl=60)
        def get_user(user_id: int, tenant: int = 3) -> dict[str, int]:
            calls.append(user_id)
            return {"id": user_id, "tenant": tenant}

        assert get_user(5) == {"id": 5, "tenant": 3} and get_user(5) == {"id": 5, "tenant": 3}
        assert calls == [5]

    async def main() -> None:
        acache = AsyncCache(redis_server.url, CacheOptions(require_registry=False, prefix=prefix, subscribe=False))

        @acache.cached(key="order:{oid}", ttl=60)
        async def get_order(oid: int) -> dict[str, int]:
            calls.append(oid)
            return {"id": oid}

        assert await get_order(9) == {"id": 9} and await get_order(9) == {"id": 9}
        await acache.close()

    asyncio.run(main())
    assert calls == [5, 9]


def test_async_race_gap_and_fail_safe(redis_server: RedisServer, r: redis.Redis, prefix: str) -> None:
    async def main() -> None:
        cache = await AsyncCache.create(redis_server.url, CacheOptions(
            require_registry=False, prefix=prefix,
            entry=EntryOptions(ttl=0.2, jitter=0.0, fail_safe_max_age=5, early_refresh_beta=0)))
        try:
            assert await cache.wait_subscribed()
            # write-back race
            gate, loading = asyncio.Event(), asyncio.Event()

            async def loader() -> str:
                loading.set()  # the fill token is taken before the loader runs
                await gate.wait()
                return "old"

            task = asyncio.create_task(cache.get_or_load("o", loader))
            await asyncio.wait_for(loading.wait(), 5)
            daemon_apply(r, prefix, "o", 300)
            gate.set()
            assert await task == "old"
            assert "d" not in entry(r, prefix + "o") and "o" not in cache.l1.data
            # fail-safe
            assert await cache.get_or_load("f", lambda: "good") == "good"
            await asyncio.sleep(0.3)

            async def broken() -> str:
                raise RuntimeError("down")

            assert await cache.get_or_load("f", broken) == "good" and cache.stats.fail_safe == 1
            # backplane gap
            ch = Keyspace(prefix).channel
            r.publish(ch, Message("cdcd", "d1", 1, "", [], [], 0).encode())
            r.publish(ch, Message("cdcd", "d1", 3, "", [], [], 0).encode())
            for _ in range(100):
                if cache.stats.backplane_gaps:
                    break
                await asyncio.sleep(0.02)
            assert cache.stats.backplane_gaps == 1
        finally:
            await cache.close()

    asyncio.run(main())


def test_cdc_update_drops_l1_within_the_bound(cfg: dict[str, Any], sql: Any, r: redis.Redis,
                                              redis_server: RedisServer) -> None:
    """End to end: a row cached in an app's L1, updated in Postgres, dropped by the daemon's message."""
    cfg["daemon"]["heartbeat"] = 1.0
    p = cfg["keyspace"]["prefix"]
    sql("INSERT INTO orders VALUES (1, 1, 7, 5.00, 'new')")
    d = DaemonThread(make_config(cfg)).start()
    try:
        with make(redis_server.url, p) as app:
            assert app.wait_subscribed()

            def load() -> dict[str, Any]:
                return {"status": sql("SELECT status FROM orders WHERE id = 1").fetchone()[0]}

            assert app.get_or_load("order:1", load) == {"status": "new"}
            assert app.get_or_load("order:1", load) == {"status": "new"} and app.stats.l1_hits == 1
            t0 = time.monotonic()
            sql("UPDATE orders SET status = 'paid' WHERE id = 1")
            wait_until(lambda: "order:1" not in app.l1.data, timeout=2, what="L1 dropped by the backplane")
            dropped = time.monotonic() - t0
            assert dropped < 0.5, f"took {dropped:.3f}s"
            assert app.get_or_load("order:1", load) == {"status": "paid"}
            # the daemon's heartbeats keep the sequence: no spurious resets while idle
            resets = app.stats.l1_resets
            time.sleep(2.2)
            assert app.stats.l1_resets == resets and app.stats.backplane_messages >= 3
    finally:
        d.stop()
