"""Apply throughput on one Redis node vs a 3-master Redis Cluster, in the same run.

Usage::

    .venv/bin/python bench/apply_cluster.py [--changes 100000] [--txn-size 10] [--max-batch 5000]

One Postgres, one single-node Redis and two local clusters started from the installed redis-server:
3 masters without replicas, and 3 masters with one replica each. ``--changes`` row changes (the mix of
bench/apply_throughput.py: insert user, insert order, update user, update order) are committed once into
one slot per variant; then ``cdcd run`` in its own process drains each slot in turn:

* **1 node**: the packed single-connection path (``RedisSink._send_packed``);
* **cluster 3 masters**: ``redis.cluster: true`` (writes on the sink's own connection per master, then the
  backplane); with ``--base-rev REV`` also the cdcd of that revision (exported with ``git archive``) on the
  same cluster, e.g. the revision whose writes went through redis-py's ``ClusterPipeline``;
* **cluster 3+3, wait_replicas 1**: the same, acknowledging a batch only once a replica of every master it
  wrote to holds it (WAIT).

The rate is the daemon's steady rate from its batch log (changes after the first batch over the time from
the first to the last batch); CPU seconds are the daemon's and the sum over that variant's Redis processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import psycopg
from redis.cluster import RedisCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DaemonProcess,
    applied_version,
    config_dict,
    heartbeat,
    load,
    machine,
    make_db,
    servers,
    steady_rate,
    table,
    unique,
    wait_until,
)
from apply_pack_micro import export
from apply_throughput import cpu_seconds, fill

from cdcd.devservers import RedisClusterServer


def drain(data: dict[str, Any], reader: Any, prefix: str, target: int, redis_pids: list[int],
          root: Path | None = None) -> list[Any]:
    d = DaemonProcess(data) if root is None else DaemonProcess(data, root=root)
    before = sum(cpu_seconds(p) for p in redis_pids)
    d.start()
    assert d.proc is not None
    try:
        wait_until(lambda: applied_version(reader, prefix) >= target, 900, interval=0.01, what="slot drained")
        daemon_cpu = cpu_seconds(d.proc.pid)
    finally:
        d.stop()
    rate, batches = steady_rate(d.events())
    return [batches, f"{rate:,.0f}", f"{daemon_cpu:.1f}", f"{sum(cpu_seconds(p) for p in redis_pids) - before:.1f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--txn-size", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=5000)
    ap.add_argument("--base-rev", help="also drain the 3-master cluster with the cdcd of this git revision")
    args = ap.parse_args()
    base = export(args.base_rev) if args.base_rev else None

    from cdcd.sources.postgres import PostgresSource

    bare = RedisClusterServer(masters=3, replicas=0)
    replicated = RedisClusterServer(masters=3, replicas=1)
    with servers() as (pg, rs):
        try:
            bare.start()
            replicated.start()
            dsn = make_db(pg)
            variants: list[tuple[str, dict[str, Any], Any, list[int], Path | None]] = []
            import redis

            assert rs.proc is not None
            single = config_dict(dsn, rs.url, unique("a"), unique("p") + ":", max_batch=args.max_batch)
            variants.append(("1 node", single, redis.Redis.from_url(rs.url), [rs.proc.pid], None))
            clusters: list[tuple[str, RedisClusterServer, dict[str, Any], Path | None]] = [
                ("cluster 3 masters", bare, {}, None),
                ("cluster 3+3, wait_replicas 1", replicated, {"wait_replicas": 1}, None)]
            if base is not None:
                clusters.insert(1, (f"cluster 3 masters, cdcd {args.base_rev}", bare, {}, base))
            for name, cluster, extra, root in clusters:
                data = config_dict(dsn, cluster.url, unique("a"), unique("p") + ":", max_batch=args.max_batch)
                data["redis"].update({"cluster": True, **extra})
                variants.append((name, data, RedisCluster.from_url(cluster.url),
                                 [p.pid for p in cluster.procs.values()], root))
            for _, data, _, _, _ in variants:  # publication + slot before the changes
                cfg = load(data)
                PostgresSource(cfg.source, cfg.rules().source).setup()
            fill_s = fill(dsn, args.changes, args.txn_size)
            with psycopg.connect(dsn, autocommit=True) as conn:
                target = heartbeat(conn)
            print(f"machine: {machine()}")
            print(f"filled {args.changes} row changes ({args.txn_size}/txn) in {fill_s:.1f}s, one slot per variant")
            rows = []
            for name, data, reader, pids, root in variants:
                rows.append([name, args.changes,
                             *drain(data, reader, data["keyspace"]["prefix"], target, pids, root)])
            print(table(["variant", "changes", "batches", "changes/s", "daemon CPU s", "redis CPU s"], rows))
        finally:
            bare.stop()
            replicated.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
