"""Per-stage cost of the hot path, in microseconds per row change, on real captured pgoutput.

Usage::

    .venv/bin/python bench/hotpath_micro.py [--changes 200000] [--repeat 5] [--no-apply]

Fills a slot with the same workload as ``apply_throughput.py`` (10 changes per transaction), reads
every raw pgoutput payload once, then times each stage alone, in this process, best of ``--repeat``
(wall time, and this process's CPU time, which a shared machine disturbs less): decoding
(:class:`PgOutputDecoder`, reading only the columns the rules use, as the daemon's source does),
planning (``Rules.plan`` in batches of 500 transactions), and applying to Redis (the sink, packed
RESP vs a redis-py pipeline; a fresh Redis each round; skipped with ``--no-apply``). Stage costs add
up to the daemon's CPU per change (plus polling, logging, metrics); the Redis column is the server's
own time in ``EVALSHA`` (``INFO commandstats``).
"""

from __future__ import annotations

import argparse
import gc
import select
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_dict, heartbeat, load, machine, make_db, servers, table, unique

from cdcd.backplane import Sequencer
from cdcd.change import Transaction
from cdcd.pg.pgoutput import PgOutputDecoder
from cdcd.sinks.redis import RedisSink


def capture(dsn: str, slot: str) -> list[tuple[bytes, int]]:
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                            options="-c DateStyle=ISO,MDY -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex")
    cur = conn.cursor()
    cur.start_replication(slot_name=slot, decode=False,
                          options={"proto_version": "1", "publication_names": slot, "messages": "true"})
    msgs: list[tuple[bytes, int]] = []
    last = time.monotonic()
    while time.monotonic() - last < 1.0:
        m = cur.read_message()
        if m is None:
            select.select([conn], [], [], 0.1)
            continue
        last = time.monotonic()
        msgs.append((m.payload, m.data_start))
    conn.close()
    return msgs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-apply", action="store_true", help="time decode and plan only (no Redis stage)")
    args = ap.parse_args()
    from apply_throughput import fill

    from cdcd.sources.postgres import PostgresSource

    with servers() as (pg, rs):
        dsn = make_db(pg)
        slot = unique("m")
        data = config_dict(dsn, rs.url, slot, unique("p") + ":")
        cfg = load(data)
        PostgresSource(cfg.source, cfg.rules().source).setup()
        fill(dsn, args.changes, 10)
        with psycopg.connect(dsn, autocommit=True) as conn:
            heartbeat(conn)
        msgs = capture(dsn, slot)
        n = args.changes
        rows = []

        rules = cfg.rules()

        def decoder(prune: bool = True) -> PgOutputDecoder:
            """As the daemon's source configures it: only the columns the rules read (where supported)."""
            dec = PgOutputDecoder("bench")
            if prune and hasattr(rules, "reads"):
                dec.reads = rules.reads
            return dec

        # Like the daemon, which holds one batch at a time, the timed loops keep nothing alive: results
        # are dropped, and the inputs are frozen out of the garbage collector's sight (otherwise every
        # full collection would walk 200k retained changes and dominate the numbers).
        gc.freeze()
        prunes = [True, False] if hasattr(rules, "reads") else [True]  # pruned, and every column decoded
        walls, cpus = {v: float("inf") for v in prunes}, {v: float("inf") for v in prunes}
        for _ in range(args.repeat):
            for prune in prunes:  # alternating, so both see the same machine
                feed = decoder(prune).feed
                t0, c0 = time.perf_counter(), time.process_time()
                for p, lsn in msgs:
                    feed(p, lsn)
                walls[prune] = min(walls[prune], time.perf_counter() - t0)
                cpus[prune] = min(cpus[prune], time.process_time() - c0)
        for prune in prunes:
            name = "decode (pgoutput -> Change)" if prune else "decode, every column (no Rules.reads)"
            rows.append([name, f"{walls[prune] / n * 1e6:.2f}", f"{cpus[prune] / n * 1e6:.2f}", "-"])
        feed = decoder().feed
        txns = [t for t in (feed(p, lsn) for p, lsn in msgs) if isinstance(t, Transaction)]

        chunks = [txns[i:i + 500] for i in range(0, len(txns), 500)]
        gc.freeze()
        best, cpu = float("inf"), float("inf")
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            for c in chunks:
                rules.plan(c)
            best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        rows.append(["plan (rules -> writes, tags)", f"{best / n * 1e6:.2f}", f"{cpu / n * 1e6:.2f}", "-"])
        planned = [rules.plan(c) for c in chunks]
        gc.freeze()

        r = redis.Redis.from_url(rs.url)
        variants = (False, True) if hasattr(RedisSink, "_send_packed") else (False,)  # older sinks: pipeline only
        if args.no_apply:
            variants = ()
        for packed in variants:
            best, cpu, server = float("inf"), float("inf"), 0.0
            for _ in range(max(1, args.repeat // 2)):
                r.flushall()
                sink = RedisSink(r, rules, Sequencer("cdcd"))
                sink.packed = packed
                sink.prepare()
                r.config_resetstat()
                t0, c0 = time.perf_counter(), time.process_time()
                for b in planned:
                    sink.apply(b)
                took = time.perf_counter() - t0
                cpu = min(cpu, time.process_time() - c0)
                if took < best:
                    best = took
                    stats: Any = r.info("commandstats")
                    server = stats["cmdstat_evalsha"]["usec"] / n
            name = "apply, packed RESP (cdcd)" if packed else "apply, redis-py pipeline (before)"
            rows.append([name, f"{best / n * 1e6:.2f}", f"{cpu / n * 1e6:.2f}", f"{server:.2f}"])
        print(f"machine: {machine()}")
        print(f"{n} row changes, {len(msgs)} pgoutput messages, {sum(len(b.writes) for b in planned)} entry writes, "
              f"{sum(len(b.tags) for b in planned)} tag bumps")
        print(table(["stage", "us per change (wall, this process)", "CPU us (this process)",
                     "of which Redis server us"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
