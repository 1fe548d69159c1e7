"""Cache-aside readers racing writers on hot rows: cdcd's fill guard against naive delete-on-write.

Usage::

    .venv/bin/python bench/race_torture.py [--seconds 60] [--readers 8] [--writers 2] [--hot 10]
                                           [--fill-delay-ms 3]

Both schemes run **at the same time, against the same writers and the same hot rows** (the
``orders`` table of the example rules, an ``invalidate`` rule), each with ``--readers`` reader threads:

* **cdcd**: ``cdcd run`` (its own process) turns every committed change into a versioned
  tombstone; readers use :class:`cdcd.fillguard.FillGuard`: read (token), query the row, wait
  ``--fill-delay-ms`` (an application's work between query and fill, which widens the race
  window), fill through the guard.
* **naive**: readers ``GET``; on a miss they query the row, wait the same delay and ``SET`` it with
  a TTL; writers ``DEL`` the key right after each commit (classic delete-on-write).

Writers update random hot rows' ``status`` to a fresh value as fast as they can, for ``--seconds``.
Every ``--checkpoint`` seconds the writers pause; once the daemon has applied every commit (and
fills in flight have landed) every hot key of both schemes is compared with its row (the bench
knows its own serialization); then the writers resume. A stale key is counted at every checkpoint
it survives (naive ones live until a later write to the row deletes them, or their 300 s TTL).
At the end the cdcd inspector (``run_inspect --all``; ``track_commit_timestamp`` is on so
application fills are dated) checks the cdcd keyspace once more.

**Nines** (issue 13): all through the run, checkpoints included, a sampler reads every hot row (with
the commit time of its last change) and then both schemes' cached values for it, ``--sample-rate``
times a second, then the rows again. The two reads of the rows bracket the database at the read (as
``cdcd inspect --watch`` brackets it): a value equal to the row (or, when the row changed around the
read, to either version) is a consistent read; one that differs is a stale read whose staleness is the
Redis clock at the read minus the commit time of the change it misses. The same code judges both
schemes, and the nines within each ``--bounds`` come from :class:`cdcd.inspect.nines.NinesCounter`.
``cdcd inspect --watch`` (:func:`cdcd.inspect.watch.run_watch`) runs alongside on the cdcd keyspace
as the product's own measure of the same thing.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import threading
import time
from functools import partial
from pathlib import Path
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
    table,
    unique,
    visibility_summary,
    wait_until,
)

from cdcd.fillguard import FillGuard
from cdcd.inspect import run_inspect
from cdcd.inspect.nines import NinesCounter, StaleRead, format_bound
from cdcd.inspect.watch import run_watch
from cdcd.inspect.watchreport import WatchReport
from cdcd.keyspace import Keyspace


def encode(row: tuple[Any, ...] | None) -> bytes | None:
    return None if row is None else json.dumps({"id": row[0], "status": row[1]}).encode()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n


class Gate:
    """Lets the writers be paused for a checkpoint: pause() returns once no write is in progress."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paused = False
        self.busy = 0

    def enter(self) -> None:
        with self.cond:
            while self.paused:
                self.cond.wait(0.1)
            self.busy += 1

    def leave(self) -> None:
        with self.cond:
            self.busy -= 1
            self.cond.notify_all()

    def pause(self) -> None:
        with self.cond:
            self.paused = True
            while self.busy:
                self.cond.wait(0.1)

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()


def writer(dsn: str, r: redis.Redis, naive_prefix: str, hot: int, stop: threading.Event, stats: Stats,
           seed: int, gate: Gate) -> None:
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 0
        while not stop.is_set():
            gate.enter()
            try:
                _write(conn, r, naive_prefix, rng, hot, seed, n, stats)
            finally:
                gate.leave()
            n += 1


def _write(conn: psycopg.Connection[Any], r: redis.Redis, naive_prefix: str, rng: random.Random, hot: int,
           seed: int, n: int, stats: Stats) -> None:
    oid = rng.randrange(hot)
    conn.execute("UPDATE orders SET status = %s WHERE id = %s", (f"s{seed}-{n}", oid), prepare=True)
    r.delete(f"{naive_prefix}order:{oid}")  # delete-on-write, right after the commit
    stats.add("writes")


def cdcd_reader(dsn: str, r: redis.Redis, prefix: str, hot: int, delay: float, stop: threading.Event,
                stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    guard = FillGuard(r, Keyspace(prefix))
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            oid = rng.randrange(hot)
            e = guard.read(f"order:{oid}")
            stats.add("reads")
            if e.hit:
                stats.add("hits")
                continue
            row = conn.execute("SELECT id, status FROM orders WHERE id = %s", (oid,), prepare=True).fetchone()
            time.sleep(rng.uniform(0, delay))
            ok = guard.fill(e, encode(row), ttl=300, negative=row is None)
            stats.add("fills" if ok else "fills_refused")


def naive_reader(dsn: str, r: redis.Redis, prefix: str, hot: int, delay: float, stop: threading.Event,
                 stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            oid = rng.randrange(hot)
            key = f"{prefix}order:{oid}"
            stats.add("reads")
            if r.get(key) is not None:
                stats.add("hits")
                continue
            row = conn.execute("SELECT id, status FROM orders WHERE id = %s", (oid,), prepare=True).fetchone()
            time.sleep(rng.uniform(0, delay))
            r.set(key, encode(row) or b"null", ex=300)
            stats.add("fills")


def direct_stale(dsn: str, r: redis.Redis, hot: int, get: Any) -> list[str]:
    """Hot keys whose cached value is not the row's current serialization."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = {i: s for i, s in conn.execute("SELECT id, status FROM orders WHERE id < %s", (hot,))}
    bad = []
    for oid in range(hot):
        cached = get(oid)
        if cached is not None and cached != encode((oid, rows[oid])):
            bad.append(f"order:{oid}")
    return bad


def sampler(dsn: str, r: redis.Redis, prefix: str, naive_prefix: str, hot: int, rate: float,
            stop: threading.Event, counters: dict[str, NinesCounter]) -> None:
    """Nines for both schemes with one judge: rows (with commit times), then both caches' values, compared."""
    q = ("SELECT id, status, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM orders "
         "WHERE id < %s ORDER BY id")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        pg_now = row[0] if row else time.time()
        sec, usec = r.time()
        offset = sec + usec / 1e6 - pg_now  # Redis clock - Postgres clock (same machine: ~0)
        while not stop.is_set():
            t0 = time.monotonic()
            rows = {i: (st, ts) for i, st, ts in conn.execute(q, (hot,), prepare=True)}
            pipe: Any = r.pipeline(transaction=False)
            pipe.time()
            for oid in range(hot):
                pipe.hget(f"{prefix}order:{oid}", "d")
                pipe.get(f"{naive_prefix}order:{oid}")
            res = pipe.execute()
            read_at = res[0][0] + res[0][1] / 1e6
            again = {i: (st, ts) for i, st, ts in conn.execute(q, (hot,), prepare=True)}
            for oid in range(hot):
                # the rows before and after the read bracket the database at the read (as inspect --watch does)
                (s0, c0), (s1, c1) = rows[oid], again[oid]
                unchanged = (s0, c0) == (s1, c1) or (c1 is not None and c1 + offset <= read_at)
                at_read = [s1] if unchanged else [s0, s1]
                for scheme, raw in (("cdcd", res[1 + 2 * oid]), ("naive", res[2 + 2 * oid])):
                    if not isinstance(raw, bytes) or raw == b"null":
                        counters[scheme].record_miss()
                    elif any(raw == encode((oid, st)) for st in at_read):
                        counters[scheme].record_consistent()
                    else:
                        missed = c1 if unchanged else c0
                        staleness = read_at - (missed + offset) if missed is not None else None
                        counters[scheme].record_stale(StaleRead(f"order:{oid}", staleness, "differs", scheme))
            stop.wait(max(0.0, 1.0 / rate - (time.monotonic() - t0)))


def caught_up(r: redis.Redis, prefix: str, target: int) -> bool:
    return applied_version(r, prefix) >= target


def cdcd_value(r: redis.Redis, prefix: str, oid: int) -> bytes | None:
    d = r.hget(f"{prefix}order:{oid}", "d")
    return d if isinstance(d, bytes) else None


def naive_value(r: redis.Redis, prefix: str, oid: int) -> bytes | None:
    v = r.get(f"{prefix}order:{oid}")
    return v if isinstance(v, bytes) and v != b"null" else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--readers", type=int, default=8, help="reader threads per scheme")
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--hot", type=int, default=10, help="hot rows")
    ap.add_argument("--fill-delay-ms", type=float, default=5.0, help="max random pause between query and fill")
    ap.add_argument("--checkpoint", type=float, default=1.0, help="seconds between quiescent checkpoints")
    ap.add_argument("--sample-rate", type=float, default=100.0,
                    help="nines sampler rounds per second (each reads every hot key of both schemes)")
    ap.add_argument("--bounds", default="0.01,0.1,1", help="staleness bounds for the nines, seconds")
    ap.add_argument("--watch-rate", type=float, default=1000.0, help="rows/s for the concurrent inspect --watch")
    ap.add_argument("--watch-clock-margin", type=float, default=0.05,
                    help="inspect --watch's --clock-margin (app values written less than this before a change "
                         "are judged fresh)")
    args = ap.parse_args()
    bounds = tuple(float(b) for b in args.bounds.split(","))
    with servers({"track_commit_timestamp": "on"}) as (pg, rs):
        dsn = make_db(pg)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO orders SELECT i, i, i %% 3, 1.00, 'new' FROM generate_series(0, %s) i",
                         (args.hot - 1,))
        prefix = unique("race") + ":"
        naive_prefix = unique("naive") + ":"
        data = config_dict(dsn, rs.url, unique("s"), prefix)
        daemon = DaemonProcess(data).start()
        daemon.wait_ready()
        r = redis.Redis.from_url(rs.url)
        stop = threading.Event()
        cd_stats, nv_stats, w_stats = Stats(), Stats(), Stats()
        delay = args.fill_delay_ms / 1000
        gate = Gate()
        threads = [threading.Thread(target=writer, args=(dsn, r, naive_prefix, args.hot, stop, w_stats, i, gate))
                   for i in range(args.writers)]
        threads += [threading.Thread(target=cdcd_reader, args=(dsn, r, prefix, args.hot, delay, stop, cd_stats,
                                                               100 + i)) for i in range(args.readers)]
        threads += [threading.Thread(target=naive_reader, args=(dsn, r, naive_prefix, args.hot, delay, stop,
                                                                nv_stats, 200 + i)) for i in range(args.readers)]
        counters = {"cdcd": NinesCounter(bounds), "naive": NinesCounter(bounds)}
        threads.append(threading.Thread(target=sampler, args=(dsn, r, prefix, naive_prefix, args.hot,
                                                              args.sample_rate, stop, counters)))
        watched: list[WatchReport] = []
        threads.append(threading.Thread(target=lambda: watched.append(run_watch(
            load(data), bounds=bounds, rate=args.watch_rate, batch=args.hot, settle_timeout=10.0,
            duration=args.seconds, check_bound=max(bounds), min_nines=None, out=None, log_interval=3600,
            stop=stop, clock_margin=args.watch_clock_margin))))
        print(f"machine: {machine()}")
        print(f"{args.seconds:.0f}s, {args.writers} writers, {args.readers} readers per scheme, {args.hot} hot rows, "
              f"fill delay up to {args.fill_delay_ms} ms, a checkpoint every {args.checkpoint}s; daemon in a "
              f"subprocess; nines sampler {args.sample_rate}/s; inspect --watch at {args.watch_rate} rows/s, "
              f"clock margin {args.watch_clock_margin}s")
        for t in threads:
            t.start()
        seen = {"cdcd": 0, "naive": 0}
        checkpoints = 0
        end = time.monotonic() + args.seconds
        with psycopg.connect(dsn, autocommit=True) as hb:
            while time.monotonic() < end:
                time.sleep(min(args.checkpoint, max(0.0, end - time.monotonic())))
                # Checkpoint: no write in progress, the daemon has applied every commit, fills that were
                # in flight have landed (readers keep reading: the database is still, so new fills are fresh).
                gate.pause()
                target = heartbeat(hb)
                wait_until(partial(caught_up, r, prefix, target), 60, what="daemon caught up")
                time.sleep(delay + 0.05)
                seen["cdcd"] += len(direct_stale(dsn, r, args.hot, lambda oid: cdcd_value(r, prefix, oid)))
                seen["naive"] += len(direct_stale(dsn, r, args.hot, lambda oid: naive_value(r, naive_prefix, oid)))
                checkpoints += 1
                gate.resume()
        stop.set()
        for t in threads:
            t.join(30)
        with psycopg.connect(dsn, autocommit=True) as conn:
            target = heartbeat(conn)
        wait_until(lambda: applied_version(r, prefix) >= target, 60, what="daemon caught up")
        out = io.StringIO()
        report = run_inspect(load(data), None, True, 100_000, 0.0, 30.0, out)
        print(visibility_summary(daemon))
        daemon.stop()

        cd_direct = direct_stale(dsn, r, args.hot, lambda oid: cdcd_value(r, prefix, oid))
        nv_direct = direct_stale(dsn, r, args.hot, lambda oid: naive_value(r, naive_prefix, oid))
        c, n = cd_stats.counts, nv_stats.counts
        rows = [
            ["row updates committed", w_stats.counts.get("writes", 0), w_stats.counts.get("writes", 0)],
            ["reads", c.get("reads", 0), n.get("reads", 0)],
            ["hits", c.get("hits", 0), n.get("hits", 0)],
            ["fills written", c.get("fills", 0), n.get("fills", 0)],
            ["fills refused by the guard", c.get("fills_refused", 0), "-"],
            [f"stale keys seen at {checkpoints} quiescent checkpoints (sum)", seen["cdcd"], seen["naive"]],
            ["stale keys after the run (direct)", len(cd_direct), len(nv_direct)],
            ["stale keys (cdcd inspect --all)", len(report.stale), "n/a (not a cdcd entry)"],
        ]
        cn, nn = counters["cdcd"], counters["naive"]
        w = watched[0].counter if watched else None
        rows += [
            ["sampled reads (values served)", cn.reads, nn.reads],
            ["stale reads (any staleness)", cn.stale, nn.stale],
            ["max staleness of a stale read", f"{cn.max_staleness:.3f}s", f"{nn.max_staleness:.3f}s"],
        ]
        for b in bounds:
            rows.append([f"**nines within {format_bound(b)}** (stale beyond)",
                         f"{cn.at(b).text()} ({cn.stale_beyond(b)})", f"{nn.at(b).text()} ({nn.stale_beyond(b)})"])
        if w is not None:
            for b in bounds:
                rows.append([f"`cdcd inspect --watch` nines within {format_bound(b)} ({w.reads} reads)",
                             f"{w.at(b).text()} ({w.stale_beyond(b)} stale beyond)", "n/a (not a cdcd entry)"])
        print(table(["", "cdcd fill guard", "naive delete-on-write"], rows))
        print(f"inspector: {report.keys_checked} keys checked, {report.cached} cached, {report.fresh} fresh, "
              f"{report.unverifiable} unverifiable, {len(report.unsettled)} unsettled, exit code {report.exit_code}")
        if nv_direct:
            print(f"naive stale keys: {', '.join(nv_direct)} (they stay until their 300 s TTL)")
        if cd_direct or report.stale or seen["cdcd"]:
            print("cdcd stale keys: " + ", ".join(cd_direct + [s.key for s in report.stale]))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
