"""The client's Redis round trips on one node vs a 3-master cluster (L1 off, so every read goes to L2).

Usage::

    .venv/bin/python bench/client_cluster.py [--ops 3000]

One single-node Redis and one local cluster (3 masters), both from the installed redis-server. For each:
``get`` of an entry (HMGET + PTTL), ``get`` of an entry recording 3 tags (their counters on other nodes),
and ``set`` with 3 tags (READ + ENSURE_TAGs, then the guarded FILL, then the backplane publish). On the
cluster twice: the link's own per-node batches (``ClusterLink._direct``: packed, written to every master
before any answer is read) and every batch through redis-py's ``ClusterPipeline``. Median and p99 per call
in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table

from cdcd.client import Cache, CacheOptions
from cdcd.devservers import RedisClusterServer, RedisServer


def timed(fn: Callable[[int], Any], n: int) -> tuple[float, float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e6)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.99)]


def run(name: str, client: Any, ops: int, direct: bool = True) -> list[list[Any]]:
    cache = Cache(client, CacheOptions(prefix="b:", l1_max_entries=0, require_registry=False, subscribe=False))
    if not direct:
        cache.link.direct = False  # every batch through redis-py's ClusterPipeline
    try:
        for i in range(100):
            cache.set(f"plain:{i}", {"i": i})
            cache.set(f"tagged:{i}", {"i": i}, tags=["a", "b", f"c{i}"])
        rows = []
        for what, fn in (("get (no tags)", lambda i: cache.get(f"plain:{i % 100}")),
                         ("get (3 tags)", lambda i: cache.get(f"tagged:{i % 100}")),
                         ("set (3 tags)", lambda i: cache.set(f"w:{i % 500}", {"i": i}, tags=["a", "b", "c"]))):
            med, p99 = timed(fn, ops)
            rows.append([name, what, ops, f"{med:.0f}", f"{p99:.0f}"])
        return rows
    finally:
        cache.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=3000)
    args = ap.parse_args()
    from redis import Redis
    from redis.cluster import RedisCluster

    single, cluster = RedisServer(), RedisClusterServer(masters=3, replicas=0)
    single.start()
    try:
        cluster.start()
        print(f"machine: {machine()}")
        rows = run("1 node", Redis.from_url(single.url), args.ops)
        rows += run("cluster, own per-node batches", RedisCluster.from_url(cluster.url), args.ops)
        rows += run("cluster, ClusterPipeline", RedisCluster.from_url(cluster.url), args.ops, direct=False)
        print(table(["redis", "call", "ops", "median µs", "p99 µs"], rows))
    finally:
        single.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
