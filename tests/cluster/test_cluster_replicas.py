"""Hot-key replicas on a real 4-master Redis Cluster (docs/hot-keys.md): the spread of one hot key's reads over
the masters (commands counted per master, deterministic), and a race torture across the copies with the daemon.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis.cluster import RedisCluster

from cdcd.client import AsyncCache, Cache, CacheOptions
from cdcd.client.typed import TypedSerializer
from cdcd.devservers import RedisClusterServer
from cdcd.keyspace import Keyspace, replica_slots
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from hot_replicas import measure

SLOTS = replica_slots(4)


@pytest.fixture(scope="module")
def cluster4() -> Iterator[RedisClusterServer]:
    server = RedisClusterServer(masters=4, replicas=0)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_four_replicas_spread_a_hot_key_over_four_masters(cluster4: RedisClusterServer) -> None:
    cluster4.wait_ok()
    p = unique("hr")
    today, one, four = (measure(cluster4, n, 1000, f"{p}{n or 0}:") for n in (None, 1, 4))
    assert all(m["hits"] >= 1000 for m in (today, one, four))  # every measured read was an L2 hit
    assert sum(x > 0 for x in four["per_master"]) == 4  # every master serves a copy
    assert today["hottest"] / four["hottest"] >= 3, (today, four)
    assert one["hottest"] / four["hottest"] >= 3, (one, four)


def _status(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status FROM orders WHERE id = 1").fetchone()
    assert row is not None
    return str(row[0])


def test_race_torture_across_replicas(cluster4: RedisClusterServer, app_db: str, sql: Any) -> None:
    cluster4.wait_ok()
    cfg = config_dict(app_db, cluster4.url, unique("s"), unique("p") + ":")
    cfg["redis"].update({"cluster": True, "urls": cluster4.urls[1:3]})
    cfg["tables"]["users"]["replicas"] = 4
    cfg["tables"]["orders"]["replicas"] = 4
    p = cfg["keyspace"]["prefix"]
    ks = Keyspace(p)
    rc = RedisCluster.from_url(cluster4.url)
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'n00000', 7)")
    sql("INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (1, 1, 7, 1, 'n00000')")
    d = DaemonThread(make_config(cfg)).start()
    opts = CacheOptions(prefix=p, l1_max_entries=0, subscribe=False, read_replicas=True)
    stop = threading.Event()
    backwards: list[tuple[int, int]] = []
    served = [0]
    fills: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def loader() -> dict[str, Any]:
        return {"id": 1, "name": _status(app_db)}

    def get_reader() -> None:  # user:1 is read only from copies the daemon wrote: names rise with versions
        cache = Cache(cluster4.url.replace("redis://", "redis+cluster://"), opts)
        last = -1
        try:
            while not stop.is_set():
                v = cache.get("user:1")
                if v is not None:
                    n = int(v["name"][1:])
                    if n < last:
                        backwards.append((last, n))
                    last = max(last, n)
                    served[0] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            cache.close()

    def fill_reader() -> None:  # order:1 (invalidate rule): misses load from the database and fill the copy they read
        cache = Cache(cluster4.url.replace("redis://", "redis+cluster://"), opts)
        try:
            while not stop.is_set():
                cache.get_or_load("order:1", loader)
        except BaseException as exc:
            errors.append(exc)
        finally:
            fills.append(cache.stats.snapshot())
            cache.close()

    def async_reader() -> None:  # the asyncio driver, on both keys
        async def main() -> None:
            async with AsyncCache(cluster4.url.replace("redis://", "redis+cluster://"), opts) as cache:
                last = -1
                while not stop.is_set():
                    v = await cache.get("user:1")
                    if v is not None:
                        n = int(v["name"][1:])
                        if n < last:
                            backwards.append((last, n))
                        last = max(last, n)
                    await cache.get_or_load("order:1", loader)

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f, daemon=True)
               for f in (get_reader, get_reader, fill_reader, fill_reader, async_reader)]
    try:
        for t in threads:
            t.start()
        last_name = "n00000"
        for i in range(1, 301):
            last_name = f"n{i:05d}"
            sql("UPDATE users SET name = %s WHERE id = 1", (last_name,))
            sql("UPDATE orders SET status = %s WHERE id = 1", (last_name,))
        wait_until(lambda: all(json.loads(entry(rc, k).get("d", "{}")).get("name") == last_name
                               for k in [ks.entry("user:1"), *(ks.replica("user:1", s) for s in SLOTS)]),
                   timeout=30, what="the last update on every copy of user:1")
        stop.wait(1.0)  # readers keep filling a little after convergence
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        d.stop()
    assert _status(app_db) == last_name
    assert not errors, errors
    assert served[0] > 100 and backwards == []
    assert sum(f["fills"] for f in fills) > 0 and sum(f["loader_calls"] for f in fills) > 0
    print("torture:", served[0], "copy reads of user:1;", {k: sum(f[k] for f in fills) for k in
          ("l2_hits", "loader_calls", "fills", "fills_refused", "replica_behind")}, "for order:1")
    stale = []
    loads = TypedSerializer().loads  # an app fill is in the client's format
    for key in ("user:1", "order:1"):
        for rk in (ks.entry(key), *(ks.replica(key, s) for s in SLOTS)):
            raw = rc.hgetall(rk)
            if b"d" in raw:
                value = json.loads(raw[b"d"]) if raw.get(b"s") == b"cdc" else loads(raw[b"d"])
                if value.get("name", value.get("status")) != last_name:
                    stale.append((rk, raw))
    rc.close()
    assert stale == []
