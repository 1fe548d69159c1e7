"""Read-your-writes: how long ``Cache.wait_applied`` waits after a commit, at background change rates.

Usage::

    .venv/bin/python bench/ryw_latency.py [--rates 0,1000,5000] [--seconds 10] [--samples-per-second 50]

Setup: throwaway Postgres + Redis, ``cdcd run`` (example rules) in its own process, a ``Cache`` in
this process. A background thread commits single-row updates of ``users`` at the given rate (open
loop, paced every 10 ms); the foreground commits an update of its own row, reads
``commit_position()`` and times ``wait_applied(position)``: commit -> the daemon applied it and its
watermark reached this process over the backplane (or Redis, when the backplane was slower). Prints
p50/p99/max per rate.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DaemonProcess, config_dict, machine, make_db, pct, servers, table, unique
from cdcd.client import Cache, CacheOptions, commit_position


class Load(threading.Thread):
    def __init__(self, dsn: str, rate: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate, self.seconds = dsn, rate, seconds
        self.done = 0

    def run(self) -> None:
        if not self.rate:
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            start = time.monotonic()
            while (now := time.monotonic()) - start < self.seconds:
                due = int((now - start) * self.rate)
                while self.done < due:
                    conn.execute("UPDATE users SET name = md5(random()::text) WHERE id = %s",
                                 (1000 + self.done % 5000,))
                    self.done += 1
                time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0,1000,5000")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--samples-per-second", type=float, default=50)
    args = ap.parse_args()
    print(machine())
    rows = []
    with servers() as (pg, rs):
        dsn = make_db(pg)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) "
                         "SELECT g, 'u' || g || '@x', 'n', 1 FROM generate_series(1, 6000) g")
        prefix = unique("b") + ":"
        daemon = DaemonProcess(config_dict(dsn, rs.url, unique("s"), prefix)).start()
        cache = Cache(rs.url, CacheOptions(prefix=prefix, ryw_timeout=5))
        try:
            daemon.wait_ready()
            assert cache.wait_subscribed()
            for rate in (int(x) for x in args.rates.split(",")):
                load = Load(dsn, rate, args.seconds)
                load.start()
                waits: list[float] = []
                timeouts = 0
                with psycopg.connect(dsn, autocommit=True) as conn:
                    start = time.monotonic()
                    i = 0
                    while time.monotonic() - start < args.seconds:
                        i += 1
                        conn.execute("UPDATE users SET name = %s WHERE id = 1", (f"x{i}",))
                        pos = commit_position(conn)
                        t0 = time.perf_counter()
                        ok = cache.wait_applied(pos)
                        waits.append((time.perf_counter() - t0) * 1000)
                        timeouts += not ok
                        time.sleep(1 / args.samples_per_second)
                load.join()
                achieved = load.done / args.seconds
                rows.append([rate, round(achieved), len(waits), f"{pct(waits, 50):.2f}", f"{pct(waits, 99):.2f}",
                             f"{max(waits):.2f}", timeouts])
        finally:
            cache.close()
            daemon.stop()
    print(table(["background rate/s", "achieved/s", "samples", "wait p50 ms", "wait p99 ms", "max ms", "timeouts"],
                rows))


if __name__ == "__main__":
    main()
