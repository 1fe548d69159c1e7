"""Daemon memory and time for one huge transaction (issue 15 item 5: bounded memory).

Usage::

    .venv/bin/python bench/big_transaction.py [--rows 2000000] [--no-cap]

A throwaway Postgres and Redis (``cdcd.devservers``); ``--rows`` users are inserted
*before* ``cdcd run`` starts (so they are not streamed), then one transaction
``UPDATE users SET name = name || '!'`` changes every row (REPLICA IDENTITY FULL:
old and new tuple per row). Printed: the daemon's RSS before the update, its peak
RSS (``VmHWM``) and the growth, the time the UPDATE took in Postgres, and the time
from its commit until the daemon had applied it (a non-transactional cdcd message
emitted right after the commit is applied after it).

``--no-cap`` sets ``source.max_transaction_changes``/``max_transaction_bytes`` so high
that nothing degrades: the behaviour before the cap existed (use fewer ``--rows``:
it costs ~1.2 KB of RSS per row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DaemonProcess, applied_version, config_dict, heartbeat, machine, make_db, servers, unique


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--no-cap", action="store_true", help="disable the per-transaction cap (old behaviour)")
    args = ap.parse_args()
    print(machine())
    with servers() as (pg, rs):
        dsn = make_db(pg)
        with psycopg.connect(dsn, autocommit=True) as conn:
            t0 = time.monotonic()
            conn.execute("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@example.com', "
                         "'user ' || i, i %% 100 FROM generate_series(1, %s::int) i", (args.rows,))
            print(f"filled {args.rows} rows in {time.monotonic() - t0:.1f}s (not streamed: no slot yet)")
        prefix = unique("b") + ":"
        extra = {"max_transaction_changes": 10**12, "max_transaction_bytes": 10**15} if args.no_cap else {}
        data = config_dict(dsn, rs.url, unique("s"), prefix, **extra)
        d = DaemonProcess(data).start()
        r = redis.Redis.from_url(rs.url)
        try:
            d.wait_ready()
            assert d.proc is not None
            time.sleep(1.0)  # let the first keepalives and imports settle
            before = rss_kib(d.proc.pid)
            with psycopg.connect(dsn, autocommit=True) as conn:
                t0 = time.monotonic()
                conn.execute("UPDATE users SET name = name || '!'")
                t_commit = time.monotonic()
                mark = heartbeat(conn)
            while applied_version(r, prefix) < mark:
                if not d.alive:
                    raise SystemExit(f"daemon died (log: {d.log_path})")
                time.sleep(0.05)
            t_applied = time.monotonic()
            after = rss_kib(d.proc.pid)
            degraded = [e for e in d.events() if e.get("event") == "transaction_degraded"]
        finally:
            d.stop()
    growth = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"rows changed in one transaction: {args.rows}  cap: {'off' if args.no_cap else 'default'}")
    print(f"daemon RSS before: {before['VmRSS'] / 1024:.1f} MiB  peak: {after['VmHWM'] / 1024:.1f} MiB  "
          f"growth: {growth:.1f} MiB ({growth * 1024 * 1024 / args.rows:.0f} B/row)")
    print(f"UPDATE in Postgres: {t_commit - t0:.1f}s  commit -> applied by cdcd: {t_applied - t_commit:.1f}s")
    print(f"degraded transactions logged: {len(degraded)}")


if __name__ == "__main__":
    main()
