"""Client read throughput: cdcd.client vs cashews, aiocache, dogpile.cache and raw redis-py, in one run.

    .venv/bin/python bench/client_bench.py [--rounds 5] [--l1-n 300000] [--l2-n 5000]

Workload: one key, a ~90-byte JSON object, read over and over by one caller.

* **L1 hit**: the value is in the process. cdcd: ``Cache.get`` / ``get_or_load`` (sync) and
  ``AsyncCache.get``; dogpile.cache ``memory`` region (sync); cashews ``mem://`` and aiocache
  ``SimpleMemoryCache`` (async-only libraries); cashews ``redis://?client_side=true`` (its L1 over
  Redis with server-assisted invalidation: the closest peer to cdcd's L1+L2+backplane).
* **L2 hit**: every read goes to Redis on loopback. cdcd with L1 off (``l1_max_entries=0``):
  ``get`` (HMGET + PTTL, pipelined) and ``get_or_load`` (READ script + PTTL); dogpile.cache
  ``redis`` region (sync); raw redis-py ``GET`` (the baseline, bytes only) and ``GET`` +
  ``json.loads``; cashews / aiocache Redis backends and raw ``redis.asyncio`` GET (async).

The machine is shared, so each row is measured ``--rounds`` times, rounds interleaved across
rows, and the best round is reported (the least-disturbed one) next to the median. The L2
latency ratio to raw redis-py GET is given as the median of per-round ratios (both measured
seconds apart in the same round, so machine load mostly cancels) and as best vs best.

Peers are bench-only dependencies: ``pip install cashews aiocache dogpile.cache``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from itertools import repeat
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio as aredis

from cdcd.client import AsyncCache, Cache, CacheOptions, EntryOptions, HotKeyOptions
from cdcd.devservers import redis_server

VALUE = {"id": 42, "email": "ada@example.com", "name": "Ada Lovelace", "tenant_id": 7, "active": True}
KEY = "user:42"


def sync_rate(fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> float:
    for _ in repeat(None, min(n // 10, 2000)):
        fn(*args)
    t0 = time.perf_counter()
    for _ in repeat(None, n):
        fn(*args)
    return n / (time.perf_counter() - t0)


async def async_rate(fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], n: int) -> float:
    for _ in repeat(None, min(n // 10, 2000)):
        await fn(*args)
    t0 = time.perf_counter()
    for _ in repeat(None, n):
        await fn(*args)
    return n / (time.perf_counter() - t0)


class Row:
    def __init__(self, tier: str, api: str, name: str, measure: Callable[[], float]) -> None:
        self.tier, self.api, self.name, self.measure = tier, api, name, measure
        self.rates: list[float] = []

    @property
    def best(self) -> float:
        return max(self.rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--l1-n", type=int, default=300_000)
    ap.add_argument("--l2-n", type=int, default=5_000)
    args = ap.parse_args()
    l1n, l2n = args.l1_n, args.l2_n
    data = json.dumps(VALUE, separators=(",", ":")).encode()
    loop = asyncio.new_event_loop()
    rows: list[Row] = []

    def sync_row(tier: str, name: str, fn: Callable[..., Any], *fargs: Any) -> None:
        n = l1n if tier == "L1 hit" else l2n
        rows.append(Row(tier, "sync", name, lambda: sync_rate(fn, fargs, n)))

    def async_row(tier: str, name: str, fn: Callable[..., Awaitable[Any]], *fargs: Any) -> None:
        n = l1n if tier == "L1 hit" else l2n
        rows.append(Row(tier, "async", name, lambda: loop.run_until_complete(async_rate(fn, fargs, n))))

    with redis_server() as rs:
        r = redis.Redis.from_url(rs.url)
        r.set("raw:" + KEY, data)

        def loader() -> dict[str, Any]:
            return VALUE

        # ------------------------------------------------------------------ cdcd
        entry = EntryOptions(ttl=3600, jitter=0.0)
        nd = {"require_registry": False}  # no daemon runs here: nothing restores a registry
        l1 = Cache(rs.url, CacheOptions(prefix="b1:", entry=entry, **nd))  # backplane on, as in production
        l1.get_or_load(KEY, loader)
        l2 = Cache(rs.url, CacheOptions(prefix="b1:", l1_max_entries=0, subscribe=False, entry=entry, **nd))
        al1 = AsyncCache(rs.url, CacheOptions(prefix="b1:", subscribe=False, entry=entry, **nd))
        al2 = AsyncCache(rs.url, CacheOptions(prefix="b1:", l1_max_entries=0, subscribe=False, entry=entry, **nd))
        loop.run_until_complete(al1.get_or_load(KEY, loader))
        sync_row("L1 hit", "cdcd Cache.get", l1.get, KEY)
        # hot-key detection on (docs/hot-keys.md): the cost of the sampled sketch on the L1 hit path
        hot = Cache(rs.url, CacheOptions(prefix="b1:", subscribe=False, entry=entry, **nd,
                                         hot_keys=HotKeyOptions(sample=8, publish=False)))
        hot.get_or_load(KEY, loader)
        sync_row("L1 hit", "cdcd Cache.get (hot keys, sample 8)", hot.get, KEY)
        sync_row("L1 hit", "cdcd Cache.get_or_load (hot keys, sample 8)", hot.get_or_load, KEY, loader)
        sync_row("L1 hit", "cdcd Cache.get_or_load", l1.get_or_load, KEY, loader)
        async_row("L1 hit", "cdcd AsyncCache.get", al1.get, KEY)
        sync_row("L2 hit", "cdcd Cache.get (L1 off)", l2.get, KEY)
        sync_row("L2 hit", "cdcd Cache.get_or_load (L1 off)", l2.get_or_load, KEY, loader)
        async_row("L2 hit", "cdcd AsyncCache.get (L1 off)", al2.get, KEY)

        # ------------------------------------------------------------------ raw redis-py
        sync_row("L2 hit", "raw redis-py GET", r.get, "raw:" + KEY)
        sync_row("L2 hit", "raw redis-py GET + json.loads", lambda k: json.loads(r.get(k)),  # type: ignore[arg-type]
                 "raw:" + KEY)
        ar = aredis.Redis.from_url(rs.url)
        async_row("L2 hit", "raw redis.asyncio GET", ar.get, "raw:" + KEY)

        # ------------------------------------------------------------------ dogpile.cache (sync)
        from dogpile.cache import make_region

        dmem = make_region().configure("dogpile.cache.memory", expiration_time=3600)
        dmem.set(KEY, VALUE)
        sync_row("L1 hit", "dogpile.cache memory get", dmem.get, KEY)
        sync_row("L1 hit", "dogpile.cache memory get_or_create", dmem.get_or_create, KEY, loader)
        dred = make_region().configure("dogpile.cache.redis", expiration_time=3600,
                                       arguments={"host": "127.0.0.1", "port": rs.port})
        dred.set("dp:" + KEY, VALUE)  # every library its own key: their formats differ
        sync_row("L2 hit", "dogpile.cache redis get", dred.get, "dp:" + KEY)

        # ------------------------------------------------------------------ cashews (async only)
        from cashews import Cache as Cashews

        cmem = Cashews()
        cmem.setup("mem://")
        loop.run_until_complete(cmem.set(KEY, VALUE, expire=3600))
        async_row("L1 hit", "cashews mem:// get", cmem.get, KEY)
        cred = Cashews()
        cred.setup(f"redis://127.0.0.1:{rs.port}/0")
        loop.run_until_complete(cred.set("cw:" + KEY, VALUE, expire=3600))
        async_row("L2 hit", "cashews redis:// get", cred.get, "cw:" + KEY)
        try:
            cside = Cashews()
            cside.setup(f"redis://127.0.0.1:{rs.port}/0?client_side=true")
            loop.run_until_complete(cside.init())
            loop.run_until_complete(cside.set("cs:" + KEY, VALUE, expire=3600))
            loop.run_until_complete(cside.get("cs:" + KEY))
            async_row("L1 hit", "cashews redis client_side get", cside.get, "cs:" + KEY)
        except Exception as exc:  # depends on the server's CLIENT TRACKING support
            print(f"(cashews client_side unavailable: {exc!r})")

        # ------------------------------------------------------------------ aiocache (async only)
        from aiocache import RedisCache, SimpleMemoryCache
        from aiocache.serializers import JsonSerializer

        amem = SimpleMemoryCache()
        loop.run_until_complete(amem.set(KEY, VALUE))
        async_row("L1 hit", "aiocache SimpleMemoryCache get", amem.get, KEY)
        ared = RedisCache(serializer=JsonSerializer(), endpoint="127.0.0.1", port=rs.port)
        loop.run_until_complete(ared.set("ai:" + KEY, VALUE))
        async_row("L2 hit", "aiocache RedisCache get (json)", ared.get, "ai:" + KEY)

        for rnd in range(args.rounds):
            for row in rows:
                row.rates.append(row.measure())
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)

        l1.close()
        hot.close()
        l2.close()
        loop.run_until_complete(al1.close())
        loop.run_until_complete(al2.close())
        for closing in (cmem, cred, *([cside] if "cside" in locals() else [])):
            loop.run_until_complete(closing.close())
        loop.run_until_complete(ared.close())
        loop.run_until_complete(ar.aclose())

    print(f"python {platform.python_version()}, redis-py {redis.__version__}, {platform.machine()}, "
          f"rounds={args.rounds}, L1 n={l1n}, L2 n={l2n} (best round; median in brackets)")
    print(f"{'tier':7} {'api':5} {'implementation':40} {'gets/s':>12} {'(median)':>12} {'µs/get':>8}")
    for tier in ("L1 hit", "L2 hit"):
        for row in sorted((r for r in rows if r.tier == tier), key=lambda r: -r.best):
            print(f"{row.tier:7} {row.api:5} {row.name:40} {row.best:12,.0f} {statistics.median(row.rates):12,.0f} "
                  f"{1e6 / row.best:8.2f}")
    by = {r.name: r for r in rows}
    raw = by["raw redis-py GET"]
    for name in ("cdcd Cache.get (L1 off)", "cdcd Cache.get_or_load (L1 off)"):
        paired = statistics.median(a / b for a, b in zip(raw.rates, by[name].rates, strict=True))
        print(f"L2 latency {name} / raw redis-py GET: {paired:.2f}x (median of per-round ratios), "
              f"{raw.best / by[name].best:.2f}x (best vs best)")
    cdcd_l1 = by["cdcd Cache.get"].best
    peers = [r for r in rows if r.tier == "L1 hit" and not r.name.startswith("cdcd")]
    print(f"L1: cdcd Cache.get {cdcd_l1:,.0f} gets/s; best peer {max(peers, key=lambda r: r.best).name} "
          f"{max(r.best for r in peers):,.0f} gets/s")


if __name__ == "__main__":
    main()
