"""Hot-key replicas on a real 4-master Redis Cluster: how a single hot key's reads spread over the masters.

Usage::

    .venv/bin/python bench/hot_replicas.py [--reads 4000] [--masters 4]

One local cluster (``--masters`` masters, no replicas) from the installed redis-server. The rules (the daemon's
sink publishes them and creates the counters, exactly as a daemon starts) replicate ``user:{id}`` N times. One
client with L1 off (every read goes to Redis) reads the single key ``user:1`` ``--reads`` times; its fills came
first, so every measured read is an L2 hit. Per master: ``total_commands_processed`` delta (INFO stats; it counts
a script's own calls, so it is the work each master did) and the client's calls (INFO commandstats, script
inner calls subtracted). Rows: today's read (no replicas: the primary entry + the table tag counter, which
usually live on different masters), and ``read_replicas`` with N = 1, 2, 4. "hottest" is the busiest master's
commands per read; the ratio is today's hottest over this row's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from cdcd.backplane import Sequencer
from cdcd.client import Cache, CacheOptions
from cdcd.devservers import RedisClusterServer
from cdcd.lazycluster import LazyRedisCluster
from cdcd.rules import Defaults, KeyspaceSettings, Rules, TableRule
from cdcd.sinks.redis import RedisSink


def _stats(ports: list[int]) -> dict[int, tuple[int, float]]:
    """Per master port: (total_commands_processed, CPU seconds used by the server so far)."""
    out = {}
    for port in ports:
        r = redis.Redis(port=port)
        total = int(r.info("stats")["total_commands_processed"])
        cpu = r.info("cpu")
        out[port] = (total, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
        r.close()
    return out


def measure(cluster: RedisClusterServer, replicas: int | None, reads: int, prefix: str) -> dict[str, Any]:
    """Per-master command deltas for ``reads`` reads of one hot key (``replicas`` None: today's read path)."""
    rules = Rules({"users": TableRule(keys=["user:{id}"], action="update", replicas=replicas)},
                  KeyspaceSettings(prefix=prefix), Defaults())
    rc: Any = LazyRedisCluster(lambda: redis.RedisCluster.from_url(cluster.url))
    RedisSink(rc, rules, Sequencer("cdcd")).prepare()  # registry, table counters and their mirrors
    opts = CacheOptions(prefix=prefix, l1_max_entries=0, subscribe=False, publish=False,
                        read_replicas=replicas is not None)
    cache = Cache(cluster.url.replace("redis://", "redis+cluster://"), opts)
    try:
        for _ in range(20 * (replicas or 1)):  # every copy filled by its own miss
            cache.get_or_load("user:1", lambda: {"id": 1, "name": "hot"})
        loads, hits = cache.stats.loader_calls, cache.stats.l2_hits
        ports = cluster.master_ports()
        before = _stats(ports)
        t0 = time.perf_counter()
        for _ in range(reads):
            cache.get("user:1")
        elapsed = time.perf_counter() - t0
        after = _stats(ports)
        assert cache.stats.loader_calls == loads
    finally:
        cache.close()
        rc.close()
    total = {p: after[p][0] - before[p][0] - 2 for p in ports}  # minus the two INFO of the first sample
    cpu = {p: after[p][1] - before[p][1] for p in ports}
    return {"replicas": replicas, "per_master": [total[p] / reads for p in ports],
            "hottest": max(total.values()) / reads, "reads_per_s": reads / elapsed,
            "cpu_us": [cpu[p] / reads * 1e6 for p in ports], "hits": cache.stats.l2_hits - hits}


def run(cluster: RedisClusterServer, reads: int, prefix: str) -> list[dict[str, Any]]:
    return [measure(cluster, n, reads, f"{prefix}{n or 0}:") for n in (None, 1, 2, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--masters", type=int, default=4)
    args = ap.parse_args()
    from _common import machine, table

    cluster = RedisClusterServer(masters=args.masters, replicas=0)
    cluster.start()
    try:
        rows = run(cluster, args.reads, "hb")
    finally:
        cluster.stop()
    base = rows[0]["hottest"]
    print(machine())
    print(table(["read path", *(f"master {i}" for i in range(args.masters)), "hottest", "ratio",
                 "hottest CPU us/read", "reads/s"],
                [["today (no replicas)" if r["replicas"] is None else f"read_replicas, N={r['replicas']}",
                  *(f"{x:.2f}" for x in r["per_master"]), f"{r['hottest']:.2f}", f"{base / r['hottest']:.2f}x",
                  f"{max(r['cpu_us']):.1f}", f"{r['reads_per_s']:.0f}"] for r in rows]))
    print("master cells: commands each master processed per read (INFO stats total_commands_processed delta / "
          "reads); CPU: the busiest master's used_cpu_user+sys delta per read (one client: timing, not asserted)")


if __name__ == "__main__":
    main()
