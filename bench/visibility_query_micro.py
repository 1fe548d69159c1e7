"""What one visibility check costs the daemon: ``pg_current_snapshot()`` read and parsed, two ways.

Usage::

    .venv/bin/python bench/visibility_query_micro.py [--queries 3000] [--rounds 3]

A throwaway Postgres; one connection with cdcd's session settings. Per query: CPU of this process
(``time.process_time``) and wall time, for ``conn.execute(...).fetchone()`` and for libpq's ``PQexec``
through ``psycopg.pq`` (what ``cdcd.sources.postgres`` uses), each followed by
``cdcd.pg.visibility.parse_snapshot``. The source pays one per batch at most (none while the last
snapshot already shows the batch's transactions).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from cdcd.devservers import PostgresServer
from cdcd.pg import session
from cdcd.pg.visibility import Snapshot, parse_snapshot

QUERY = "SELECT pg_current_snapshot()::text"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    server = PostgresServer()
    server.start()
    try:
        with psycopg.connect(session.conninfo(server.dsn()), autocommit=True) as conn:
            def execute() -> Snapshot:
                row = conn.execute(QUERY).fetchone()
                return parse_snapshot(str(row[0]) if row else "")

            def pqexec() -> Snapshot:
                return parse_snapshot((conn.pgconn.exec_(QUERY.encode()).get_value(0, 0) or b"").decode())

            ways: list[tuple[str, Callable[[], Snapshot]]] = [("conn.execute", execute), ("PQexec", pqexec)]
            print("| round | way | CPU µs/query | wall µs/query |\n|---|---|---|---|")
            for rnd in range(1, args.rounds + 1):
                for name, fn in ways if rnd % 2 else reversed(ways):
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(args.queries):
                        fn()
                    cpu = 1e6 * (time.process_time() - c0) / args.queries
                    wall = 1e6 * (time.perf_counter() - t0) / args.queries
                    print(f"| {rnd} | {name} | {cpu:.1f} | {wall:.1f} |")
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
