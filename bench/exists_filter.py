"""Existence filter: database queries a scraper of absent ids costs with and without it, what a check costs,
and what the filter takes in Redis.

Usage::

    .venv/bin/python bench/exists_filter.py [--rows 100000] [--expected 10000000] [--fp-rate 0.01]
                                            [--requests 20000] [--id-space 5000000]

Setup: throwaway Postgres + Redis, ``cdcd run`` (example rules, ``users`` with ``exists_filter: {key:
"user:{id}"}``) in its own process, seeded from a snapshot of ``--rows`` users. A scraper asks for
``--requests`` random ids drawn from ``--id-space`` ids above the table's (all absent; some repeat)
through two caches in this process: one with ``exists_filter="users"``, one with negative caching
alone. Each loader call is one real ``SELECT``. Prints database queries, the latency of a filter
check (one ``EVALSHA exists_check``) and of the two caches' reads, the seeding time, and the filter's
memory (``MEMORY USAGE``), fill and estimated / observed false-positive rate.

``--drain N`` then measures what the filter costs the daemon: a daemon with the filter and one without
(the same rules otherwise, one slot each) each drain a slot holding ``N`` user inserts (10 per
transaction), ``--repeats`` times alternately; the rate is the daemon's own (batch log lines).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    DaemonProcess,
    applied_version,
    config_dict,
    insert_lsn,
    machine,
    make_db,
    pct,
    servers,
    steady_rate,
    table,
    unique,
    wait_until,
)
from cdcd.bloom import BloomParams
from cdcd.client import Cache, CacheOptions
from cdcd.client.existence import absent
from cdcd.keyspace import Keyspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--expected", type=int, default=10_000_000)
    ap.add_argument("--fp-rate", type=float, default=0.01)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--id-space", type=int, default=5_000_000)
    ap.add_argument("--drain", type=int, default=0, help="inserts per daemon drain (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.drain:
        drain(args.drain, args.repeats, args.expected, args.fp_rate)
        return
    print(machine())
    with servers() as (pg, rs):
        dsn = make_db(pg)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) "
                         "SELECT g, 'u' || g || '@x', 'n', 1 FROM generate_series(1, %s::int) g", (args.rows,))
        prefix = unique("b") + ":"
        data = config_dict(dsn, rs.url, unique("s"), prefix)
        data["tables"]["users"]["exists_filter"] = {"key": "user:{id}", "expected": args.expected,
                                                    "fp_rate": args.fp_rate}
        r = redis.Redis.from_url(rs.url)
        meta, *bitmaps = Keyspace(prefix).exists_filter("users")
        t0 = time.monotonic()
        daemon = DaemonProcess(data).start()
        filtered = Cache(rs.url, CacheOptions(prefix=prefix))
        plain = Cache(rs.url, CacheOptions(prefix=prefix))
        db = psycopg.connect(dsn, autocommit=True)
        queries = {"filtered": 0, "plain": 0}

        def loader(which: str, uid: int) -> Any:
            def load() -> Any:
                queries[which] += 1
                row = db.execute("SELECT id, name FROM users WHERE id = %s", (uid,)).fetchone()
                return None if row is None else {"id": row[0], "name": row[1]}
            return load

        try:
            daemon.wait_ready()
            wait_until(lambda: r.hget(meta, "a") is not None, 600, 0.05, "filter seeded")
            seed_s = time.monotonic() - t0
            rng = random.Random(1)
            ids = [args.rows + 1 + rng.randrange(args.id_space) for _ in range(args.requests)]
            lat: dict[str, list[float]] = {"filtered": [], "plain": [], "check": []}
            maybe = 0
            for uid in ids:
                key = f"user:{uid}"
                t = time.perf_counter()
                filtered.get_or_load(key, loader("filtered", uid), exists_filter="users")
                lat["filtered"].append((time.perf_counter() - t) * 1e6)
                t = time.perf_counter()
                plain.get_or_load(key, loader("plain", uid))
                lat["plain"].append((time.perf_counter() - t) * 1e6)
                t = time.perf_counter()
                maybe += not absent(filtered.exists, filtered.link.call, filtered.stats, "users", key)
                lat["check"].append((time.perf_counter() - t) * 1e6)
            slot = r.hget(meta, "a")
            assert slot is not None
            active = bitmaps[int(slot)]
            memory = int(r.memory_usage(active) or 0) + int(r.memory_usage(meta) or 0)
            params = BloomParams.sized(args.expected, args.fp_rate)
            fill = int(r.bitcount(active)) / params.m
        finally:
            db.close()
            filtered.close()
            plain.close()
            daemon.stop()
    saved = 1 - queries["filtered"] / max(1, queries["plain"])
    print(f"\n{args.rows} rows; {args.requests} requests for random absent ids out of {args.id_space}\n")
    print(table(["cache", "DB queries", "saved vs negative caching"],
                [["negative caching alone", queries["plain"], "-"],
                 ["exists_filter", queries["filtered"], f"{saved:.2%}"]]))
    print()
    print(table(["latency (µs)", "p50", "p99"],
                [[name, f"{pct(v, 50):.0f}", f"{pct(v, 99):.0f}"] for name, v in
                 (("filter check alone (EVALSHA exists_check)", lat["check"]),
                  ("get_or_load, exists_filter (absent id)", lat["filtered"]),
                  ("get_or_load, negative caching alone (absent id)", lat["plain"]))]))
    print()
    print(table(["filter", "value"],
                [["capacity / fp_rate", f"{args.expected:,} / {args.fp_rate}"],
                 ["m bits / k", f"{params.m:,} / {params.k}"],
                 ["MEMORY USAGE (bitmap + meta)", f"{memory:,} B ({memory / 2**20:.2f} MiB)"],
                 ["seeded after daemon start", f"{seed_s:.2f} s"],
                 ["bits set", f"{fill:.4%}"],
                 ["estimated fp rate (fill ** k)", f"{params.fp_rate(fill):.2e}"],
                 ["observed 'maybe' for absent ids", f"{maybe}/{len(ids)}"]]))


def drain(n: int, repeats: int, expected: int, fp_rate: float) -> None:
    """Daemon drain rate of ``n`` inserts with and without the filter (see the module docstring)."""
    print(machine())
    rates: dict[str, list[float]] = {"without": [], "with exists_filter": []}
    with servers() as (pg, rs):
        r = redis.Redis.from_url(rs.url)
        base = 10_000_000
        for rep in range(repeats):
            for variant in rates:
                dsn = make_db(pg)
                prefix = unique("d") + ":"
                data = config_dict(dsn, rs.url, unique("s"), prefix)
                if variant != "without":
                    data["tables"]["users"]["exists_filter"] = {"key": "user:{id}", "expected": expected,
                                                                "fp_rate": fp_rate}
                first = DaemonProcess(data).start()  # creates the slot (and seeds the filter), then stops
                first.wait_ready()
                if variant != "without":
                    meta = Keyspace(prefix).exists_filter("users")[0]
                    wait_until(lambda m=meta: r.hget(m, "a") is not None, 120, 0.05, "filter seeded")
                first.stop()
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for lo in range(0, n, 10_000):
                        last, first_id = min(10_000, n - lo) // 10 - 1, base + lo
                        conn.execute(f"DO $$ BEGIN FOR t IN 0..{last} LOOP INSERT INTO users (id, email, name, "
                                     f"tenant_id) SELECT {first_id} + t * 10 + g, 'u' || ({first_id} + t * 10 + g) "
                                     f"|| '@x', 'n', 1 FROM generate_series(1, 10) g; COMMIT; END LOOP; END $$")
                    target = insert_lsn(conn)
                daemon = DaemonProcess(data, first.workdir).start()
                try:
                    wait_until(lambda p=prefix, t=target: applied_version(r, p) >= t - 4096, 600, 0.1, "drained")
                    time.sleep(1.5)  # the batch log line of the last batches
                finally:
                    daemon.stop()
                rate, _ = steady_rate([e for e in daemon.events() if e.get("event") == "batch"])
                rates[variant].append(rate)
                print(f"repeat {rep + 1}: {variant}: {rate:,.0f} changes/s", flush=True)
    print(f"\n{n} user inserts (10 per transaction) drained by cdcd run\n")
    print(table(["daemon", "runs", "changes/s (each run)", "median"],
                [[k, len(v), ", ".join(f"{x:,.0f}" for x in v), f"{sorted(v)[len(v) // 2]:,.0f}"]
                 for k, v in rates.items()]))


if __name__ == "__main__":
    main()
