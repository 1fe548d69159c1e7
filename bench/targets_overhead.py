"""What does each extra Redis target cost? Drain the same pre-filled slot with 1, 2 and 3 targets.

Usage::

    .venv/bin/python bench/targets_overhead.py [--changes 100000] [--txn-size 10] [--rounds 2]

One Postgres and three Redis servers. With no daemon running, ``--changes`` row changes are committed
(the rotating mix of bench/apply_throughput.py) into one slot per run, so every run drains the same
changes from a slot of its own. Each run is ``cdcd run`` in its own process, with:

* ``redis:`` -- the single-target loop (docs/daemon-loop.md), the baseline;
* ``targets: 1`` -- the multi-target daemon with one target (its thread and backlog, no fan-out);
* ``targets: 2`` and ``targets: 3`` -- the same stream applied to two and three Redis servers.

Reported per run: the steady rate (changes/s from the daemon's batch log, first batch excluded; a
batch is logged when every target applied it), the wall time from process start until every target
holds the last change, and the daemon's CPU per change (from the start of its replication session to the
last change, all threads), and the CPU of the targets' Redis servers over the same span (summed: on
this machine every target's Redis shares the same cores with the daemon and Postgres, which real
deployments do not). On a shared machine the CPU figures are the steadier ones. Medians of ``--rounds``
runs per configuration (interleaved), with the range of the rates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import psycopg
import redis

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
from apply_throughput import cpu_seconds, fill, walsender_pid

from cdcd.devservers import RedisServer

KINDS = ["redis:", "targets: 1", "targets: 2", "targets: 3"]


def run_config(dsn: str, urls: list[str], kind: str, slot: str, max_batch: int) -> dict[str, Any]:
    prefix = unique("p") + ":"
    data = config_dict(dsn, urls[0], slot, prefix, max_batch=max_batch)
    if kind != "redis:":
        n = int(kind.split()[1])
        del data["redis"]
        data["targets"] = {f"t{i}": {"url": urls[i]} for i in range(n)}
    return data


def drain(data: dict[str, Any], urls: list[str], pids: list[int],
          target: int) -> tuple[float, float, int, float, float]:
    """(steady changes/s, wall s, batches, daemon CPU s, CPU s of the targets' Redis servers) of one
    ``cdcd run`` draining its slot."""
    prefix = data["keyspace"]["prefix"]
    clients = [redis.Redis.from_url(u) for u in urls]
    d = DaemonProcess(data)
    t0 = time.monotonic()
    d.start()
    assert d.proc is not None
    try:
        # start-up (imports, connections) is not per change: CPU counts from the replication session on
        wait_until(lambda: walsender_pid(data["source"]["dsn"], data["source"]["slot"]), 30, interval=0.005)
        cpu0 = cpu_seconds(d.proc.pid)
        redis0 = sum(cpu_seconds(p) for p in pids)
        wait_until(lambda: all(applied_version(c, prefix) >= target for c in clients), 600, interval=0.005,
                   what="every target holds the last change")
        wall = time.monotonic() - t0
        cpu = cpu_seconds(d.proc.pid) - cpu0
        redis_cpu = sum(cpu_seconds(p) for p in pids) - redis0
    finally:
        d.stop()
    steady, batches = steady_rate(d.events())
    return steady, wall, batches, cpu, redis_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--txn-size", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="runs per configuration, interleaved; the best is kept")
    args = ap.parse_args()

    from cdcd.sources.postgres import PostgresSource

    extra = [RedisServer(), RedisServer()]
    with servers() as (pg, rs):
        for s in extra:
            s.start()
        try:
            urls = [rs.url, *(s.url for s in extra)]
            pids = [s.proc.pid for s in (rs, *extra) if s.proc is not None]
            dsn = make_db(pg)
            plan = [(k, unique("s")) for _ in range(args.rounds) for k in KINDS]
            runs = []
            for kind, slot in plan:  # slots first: each holds every change filled below
                data = run_config(dsn, urls, kind, slot, args.max_batch)
                cfg = load(data)
                PostgresSource(cfg.source, cfg.rules().source).setup()
                runs.append((kind, data))
            fill_s = fill(dsn, args.changes, args.txn_size)
            with psycopg.connect(dsn, autocommit=True) as conn:
                target = heartbeat(conn)
            print(f"machine: {machine()}")
            print(f"filled {args.changes} row changes ({args.txn_size}/txn) in {fill_s:.1f}s; "
                  f"{len(runs)} slots, drained one at a time")
            results: dict[str, list[tuple[float, float, int, float, float]]] = {k: [] for k in KINDS}
            for kind, data in runs:
                n = 1 if kind == "redis:" else int(kind.split()[1])
                res = drain(data, urls[:n], pids[:n], target)
                print(f"  {kind:<10} {res[0]:>9,.0f} changes/s  wall {res[1]:.2f}s  batches {res[2]}  "
                      f"daemon cpu {res[3]:.2f}s  redis cpu {res[4]:.2f}s", flush=True)
                results[kind].append(res)
            base = median(r[3] for r in results["redis:"])
            rows = []
            for kind in KINDS:
                rs_ = results[kind]
                rates = [r[0] for r in rs_]
                cpu = median(r[3] for r in rs_)
                rows.append([kind, len(rs_), f"{median(rates):,.0f}", f"{min(rates):,.0f}-{max(rates):,.0f}",
                             f"{median(r[1] for r in rs_):.2f}", f"{cpu / args.changes * 1e6:.1f}",
                             f"{(cpu - base) / args.changes * 1e6:+.1f}",
                             f"{median(r[4] for r in rs_) / args.changes * 1e6:.1f}"])
            print(table(["configuration", "runs", "median changes/s", "range", "median wall s",
                         "daemon CPU us/change", "vs redis:", "Redis CPU us/change (all targets)"], rows))
        finally:
            for s in extra:
                s.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
