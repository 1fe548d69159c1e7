"""How close does ``cdcd run`` get to what this machine can do at all?

Usage::

    .venv/bin/python bench/physical_limit.py [--changes 200000] [--rounds 3] [--root before=/path/to/checkout ...]

One fill, then ``--rounds`` rounds of three measurements, each on a slot of its own holding the same
``--changes`` row changes (``apply_throughput.fill``: the rotating insert/update mix over the example
schema, 10 per transaction; every slot and publication made before the fill):

* **(a) slot drain**: a bare psycopg2 ``LogicalReplicationConnection`` loop reading the slot's raw
  pgoutput until it passes the fill, messages ignored (what the walsender and the socket allow).
* **(b) minimal CAS**: ``--changes`` pipelined ``EVALSHA`` calls (redis-py + hiredis, 1 000 per
  pipeline) of a minimal versioned compare-and-set script (HGET version, compare, HSET): what Redis and
  its client allow; Redis time per call from ``INFO commandstats``.
* **(c) cdcd run**: the daemon in its own process draining the slot (``apply_throughput.run_daemon_process``:
  changes after the first batch over the time to the last one, from its batch log). Its CPU per change
  while draining (from replication start to the drained slot, so without imports and startup) is the
  figure a busy machine disturbs least: compare that when the load average is high.

ratio = c / min(a, b), per round and of the medians (the goal of issue 9 is >= 0.7). ``--root
NAME=DIR`` (repeatable) adds a (c) per checkout, e.g. a worktree of main for before/after: the rounds
alternate the order of the checkouts. The load average is printed before every round.
"""

from __future__ import annotations

import argparse
import select
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, config_dict, heartbeat, load, machine, make_db, servers, table, unique
from apply_throughput import fill, run_daemon_process

# The least a versioned write can do: read the version, compare, write version and data.
MINIMAL_CAS = """
local v = redis.call('HGET', KEYS[1], 'v')
if v and tonumber(v) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
return 1
"""


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bare_drain(dsn: str, slot: str, publication: str, target: int, changes: int) -> float:
    """(a): changes/s of a psycopg2 replication loop that reads the slot past ``target`` and ignores the data."""
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cur = conn.cursor()
        cur.start_replication(slot_name=slot, decode=False,
                              options={"proto_version": "1", "publication_names": publication})
        t0 = 0.0
        while True:
            msg = cur.read_message()
            if msg is None:
                select.select([conn], [], [], 0.5)
                continue
            if not t0:
                t0 = time.perf_counter()
            if msg.data_start >= target:
                break
        return changes / (time.perf_counter() - t0)
    finally:
        conn.close()


def minimal_cas(r: redis.Redis, calls: int, round_no: int) -> tuple[float, float]:
    """(b): (calls/s, Redis µs per call) of pipelined EVALSHA of MINIMAL_CAS on fresh keys."""
    sha = r.script_load(MINIMAL_CAS)
    data = b"x" * 64
    r.config_resetstat()
    t0 = time.perf_counter()
    for start in range(0, calls, 1000):
        pipe: Any = r.pipeline(transaction=False)
        for i in range(start, min(calls, start + 1000)):
            pipe.execute_command("EVALSHA", sha, 1, f"cas{round_no}:{i}", i + 1, data)
        pipe.execute()
    rate = calls / (time.perf_counter() - t0)
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return rate, float(stats.get("usec_per_call", 0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--txn-size", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                    help="also run the cdcd of another checkout (repeatable); this checkout is 'this'")
    args = ap.parse_args()
    roots: list[tuple[str, Path]] = [("this", ROOT)]
    for spec in args.root:
        name, _, path = spec.partition("=")
        roots.append((name, Path(path).resolve()))

    from cdcd.sources.postgres import PostgresSource

    print(f"machine: {machine()}")
    with servers() as (pg, rs):
        dsn = make_db(pg)
        r = redis.Redis.from_url(rs.url)
        assert rs.proc is not None
        plans: list[dict[str, Any]] = []  # per round: the bare slot and a daemon config per checkout
        for _ in range(args.rounds):
            bare = config_dict(dsn, rs.url, unique("bare"), unique("pb") + ":")
            daemons = {name: config_dict(dsn, rs.url, unique("c"), unique("pc") + ":") for name, _ in roots}
            for data in (bare, *daemons.values()):  # publication + slot before the changes
                cfg = load(data)
                PostgresSource(cfg.source, cfg.rules().source).setup()
            plans.append({"bare": bare, "daemons": daemons})
        fill_s = fill(dsn, args.changes, args.txn_size)
        with psycopg.connect(dsn, autocommit=True) as conn:
            target = heartbeat(conn)  # every reader passes this only after every filled change
        print(f"filled {args.changes} row changes ({args.txn_size}/txn) in {fill_s:.1f}s into "
              f"{len(plans) * (1 + len(roots))} slots; checkouts: " + ", ".join(f"{n}={p}" for n, p in roots))
        runs: dict[str, list[float]] = {"a": [], "b": [], **{f"{k}:{n}": [] for n, _ in roots for k in ("c", "us")}}
        rows = []
        for i, plan in enumerate(plans):
            load_avg = load_average()
            src = plan["bare"]["source"]
            a = bare_drain(dsn, src["slot"], src["publication"], target, args.changes)
            b, usec = minimal_cas(r, args.changes, i)
            runs["a"].append(a)
            runs["b"].append(b)
            order = roots if i % 2 == 0 else roots[::-1]  # alternate which checkout goes first
            for name, path in order:
                data = plan["daemons"][name]
                c, _wall, batches, cpu = run_daemon_process(data, r, data["keyspace"]["prefix"], target, 900,
                                                           rs.proc.pid, root=path)
                runs[f"c:{name}"].append(c)
                us = (cpu["daemon"] - cpu["daemon_started"]) / args.changes * 1e6
                runs[f"us:{name}"].append(us)
                rows.append([i + 1, load_avg, f"{a:,.0f}", f"{b:,.0f} ({usec:.1f} µs)", name, f"{c:,.0f}",
                             batches, f"{cpu['daemon']:.1f}", f"{us:.1f}", f"{cpu['redis']:.1f}",
                             f"{c / min(a, b):.2f}"])
            print(f"round {i + 1} done (load average before it: {load_avg})", flush=True)
        print(table(["round", "load avg", "(a) slot drain/s", "(b) minimal CAS/s (Redis/call)", "checkout",
                     "(c) cdcd run/s", "batches", "daemon CPU s", "drain CPU µs/change", "Redis CPU s",
                     "c/min(a,b)"], rows))
        med = {k: statistics.median(v) for k, v in runs.items()}
        limit = min(med["a"], med["b"])
        print(f"\nmedians of {args.rounds}: (a) {med['a']:,.0f} changes/s, (b) {med['b']:,.0f} calls/s, "
              f"physical limit min(a, b) = {limit:,.0f}/s")
        for name, _ in roots:
            c = med[f"c:{name}"]
            print(f"  (c) {name}: {c:,.0f} changes/s, ratio c / min(a, b) = {c / limit:.2f}; daemon CPU per change "
                  f"while draining {med[f'us:{name}']:.1f} µs")
        print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
