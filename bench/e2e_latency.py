"""Commit -> Redis applied -> backplane received -> L1 dropped, at fixed change rates.

Usage::

    .venv/bin/python bench/e2e_latency.py [--rates 1000,5000,10000,max] [--seconds 10] [--writers 2]
                                          [--synchronous-commit on|off] [--nice-load 0] [--py-spy FILE]

Setup: a throwaway Postgres (``synchronous_commit=on`` unless told otherwise: with ``off`` the
walsender waits for the WAL writer and streaming gains 100-200 ms; ``track_commit_timestamp=on``)
and Redis; ``cdcd run`` with the example rules in **its own process**. The load is generated inside
Postgres, so that no Python client competes for the two cores: ``--writers`` backends each run a
procedure that commits single-row ``UPDATE users SET name = ... WHERE id = <fresh id>``
transactions on an open-loop schedule (checked every 8 commits; ``max`` = no pacing). Every change
touches a fresh row, so its key ``user:<id>`` names it uniquely.

Per change, latency runs from its **commit time as Postgres recorded it**
(``pg_xact_commit_timestamp(xmin)``) to the moment a subscriber in this process (``time.time()``,
the same machine's clock) saw:

* **applied**: Redis's keyspace notification for the ``HSET`` the apply script made on
  ``user:<id>`` (``notify-keyspace-events Kh``; this adds one pub/sub message per written key to
  Redis's work, so it slightly pessimises everything);
* **backplane**: the daemon's backplane message naming the key;
* **L1 dropped**: that subscriber removed the key from an in-memory dict standing in for an L1
  cache (the client library does the same work plus bookkeeping).

Per rate: p50/p95/p99/max of each, the achieved commit rate, CPU used by each process, and lag over
time (per second: p50 and p99 backplane latency of the changes committed in that second). A step is
*sustained* when >= 95 % of the rate was achieved and the backplane p50 of the last two seconds is
not above max(3 x the p50 of the first second, 50 ms), i.e. lag did not keep growing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DaemonProcess,
    batch_lines,
    config_dict,
    machine,
    make_db,
    pct,
    servers,
    table,
    unique,
    visibility_summary,
    wait_until,
)

LOAD = """
CREATE OR REPLACE PROCEDURE bench_load(first bigint, n int, rate float8, stop_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := clock_timestamp();
  ahead float8;
BEGIN
  FOR i IN 0..n - 1 LOOP
    IF i % 8 = 0 THEN
      EXIT WHEN clock_timestamp() > stop_at;
      IF rate > 0 THEN
        ahead := extract(epoch FROM t0 + make_interval(secs => i / rate) - clock_timestamp());
        IF ahead > 0.0002 THEN PERFORM pg_sleep(ahead); END IF;
      END IF;
    END IF;
    UPDATE users SET name = 'changed' WHERE id = first + i;
    COMMIT;
  END LOOP;
END $$;
"""


def generator(dsn: str, first: int, n: int, rate: float, stop_at: float, nice: int) -> None:
    """One backend committing single-row updates on schedule (rate 0 = as fast as it can)."""
    with psycopg.connect(dsn, autocommit=True, application_name="bench-writer") as conn:
        if nice:
            # the load's backend yields the CPU to the pipeline under test (as if the database's write
            # work ran on other cores); needs root
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(row[0]) if row else 0, nice)
        conn.execute("CALL bench_load(%s, %s, %s, to_timestamp(%s))", (first, n, rate, stop_at))


class Subscriber:
    """Backplane messages and keyspace notifications, timestamped on arrival, in two threads."""

    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self.bp: dict[int, float] = {}
        self.l1_dropped: dict[int, float] = {}
        self.applied: dict[int, float] = {}
        self.l1: dict[str, bytes] = {}
        self.stop = threading.Event()
        self.r = redis.Redis.from_url(url)
        self.r.config_set("notify-keyspace-events", "Kh")
        self._bp: Any = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._bp.subscribe(f"{prefix}#cdcd:bp")
        self._ks: Any = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._ks.psubscribe(f"__keyspace@0__:{prefix}user:[0-9]*")
        self.threads = [threading.Thread(target=self._run_bp, daemon=True),
                        threading.Thread(target=self._run_ks, daemon=True)]
        for t in self.threads:
            t.start()

    def _run_bp(self) -> None:
        key_prefix = f"{self.prefix}user:"
        cut = len(key_prefix)
        l1 = self.l1
        while not self.stop.is_set():
            msg = self._bp.get_message(timeout=0.1)
            if msg is None:
                continue
            now = time.time()
            body = json.loads(msg["data"])
            for k in body["k"]:
                if k.startswith(key_prefix) and k[cut:].isdigit():
                    uid = int(k[cut:])
                    self.bp.setdefault(uid, now)
                    l1.pop(k, None)
                    self.l1_dropped.setdefault(uid, time.time())

    def _run_ks(self) -> None:
        cut = len(f"__keyspace@0__:{self.prefix}user:")
        while not self.stop.is_set():
            msg = self._ks.get_message(timeout=0.1)
            if msg is None:
                continue
            now = time.time()
            self.applied.setdefault(int(msg["channel"][cut:]), now)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self._bp.close()
        self._ks.close()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by each part of the set-up during a step (from /proc).

    The writers' Postgres backends exit with their connections, so a thread keeps reading their
    counters while they live and the last reading counts.
    """

    def __init__(self, dsn: str, pids: dict[str, int]) -> None:
        self.dsn = dsn
        self.pids = dict(pids)
        self.before: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.groups: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.before = {pid: cpu_seconds(pid) for pid in self.pids.values()}
        self.last = {}
        self.groups = {"pg writer backends": [], "walsender": []}
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                for pid, app, kind in conn.execute(
                        "SELECT pid, application_name, backend_type FROM pg_stat_activity").fetchall():
                    group = ("pg writer backends" if app == "bench-writer"
                             else "walsender" if kind == "walsender" else None)
                    if group is None:
                        continue
                    if pid not in self.before:
                        self.before[pid] = cpu_seconds(pid)
                        self.groups[group].append(pid)
                    now = cpu_seconds(pid)
                    if now:
                        self.last[pid] = now
                self._stop.wait(0.05)

    def stop(self, writer_cpu: float) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        used = {name: cpu_seconds(pid) - self.before.get(pid, 0.0) for name, pid in self.pids.items()}
        for name, pids in self.groups.items():
            used[name] = sum(self.last.get(p, self.before[p]) - self.before[p] for p in pids)
        used["writers (python)"] = writer_cpu
        return used


def step(dsn: str, sub: Subscriber, first_id: int, rate: float | None, seconds: float, writers: int,
         max_rows: int, meter: CpuMeter | None = None, nice: int = 0) -> dict[str, Any]:
    n_total = int(rate * seconds) if rate else max_rows
    per = n_total // writers
    for uid in range(first_id, first_id + per * writers):
        sub.l1[f"{sub.prefix}user:{uid}"] = b"x"  # L1 holds every key the step touches
    writer_cpu = 0.0
    if meter is not None:
        meter.start()
    stop_at = time.time() + (seconds * 3 if rate else seconds)
    threads = [threading.Thread(target=generator, args=(dsn, first_id + w * per, per, (rate or 0) / writers,
                                                        stop_at, nice)) for w in range(writers)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    step_wall = time.perf_counter() - t_start
    cpu_used = meter.stop(writer_cpu) if meter is not None else {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        # commit time of every change, from Postgres itself (track_commit_timestamp): the clock the
        # subscribers read (time.time) is the same machine's
        timed = [(int(u), float(t)) for u, t in conn.execute(
            "SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM users "
            "WHERE id >= %s AND id < %s AND name = 'changed'", (first_id, first_id + per * writers))]
    timed.sort(key=lambda x: x[1])
    wait_until(lambda: all(u in sub.bp for u, _ in timed[-200:]), 120, interval=0.05, what="last changes applied")
    time.sleep(0.3)
    t_first = timed[0][1]
    t_last = timed[-1][1]
    achieved = len(timed) / max(t_last - t_first, 1e-9)
    res: dict[str, Any] = {"rate": rate, "commits": len(timed), "achieved": achieved,
                           "cores": {k: v / step_wall for k, v in cpu_used.items() if k != "writers (python)"}}
    for name, got in (("applied", sub.applied), ("backplane", sub.bp), ("l1", sub.l1_dropped)):
        lat = [(got[u] - t) * 1000 for u, t in timed if u in got]
        res[name] = (pct(lat, 50), pct(lat, 95), pct(lat, 99), max(lat) if lat else float("nan"))
        res[name + "_missing"] = sum(1 for u, _ in timed if u not in got)
    per_sec: dict[int, list[float]] = {}
    for u, committed in timed:
        if u in sub.bp:
            per_sec.setdefault(int(committed - t_first), []).append((sub.bp[u] - committed) * 1000)
    res["per_second"] = [(s, len(v), pct(v, 50), pct(v, 99)) for s, v in sorted(per_sec.items())]
    secs = [x for x in res["per_second"] if x[1] >= 0.2 * (rate or 0)]  # whole seconds only
    early = [p50 for _, _, p50, _ in secs[:1]]
    late = [p50 for _, _, p50, _ in secs[-2:]]
    growing = bool(early and late and max(late) > max(3 * early[0], 50.0))
    res["sustained"] = (achieved >= 0.95 * rate if rate else True) and not growing
    res["growing"] = growing
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1000,5000,10000,max", help="changes/s per step; 'max' = unthrottled")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--writers", type=int, default=2, help="load-generator backends (one CALL each)")
    ap.add_argument("--synchronous-commit", default="on", choices=["on", "off"])
    ap.add_argument("--nice-load", type=int, default=0,
                    help="nice value for the generator backends (default 0: they compete equally with the "
                         "daemon, walsender and Redis for the 2 cores)")
    ap.add_argument("--root", type=Path, help="run the cdcd of another checkout (e.g. a worktree of main)")
    ap.add_argument("--py-spy", type=Path, help="sample the daemon with py-spy for the whole run (collapsed stacks)")
    args = ap.parse_args()
    rates = [None if r == "max" else float(r) for r in args.rates.split(",")]
    max_rows = 400_000  # the unthrottled step gets this many fresh rows at most
    total = sum(int(r * args.seconds) if r else max_rows for r in rates) + 10
    with servers({"synchronous_commit": args.synchronous_commit, "track_commit_timestamp": "on"}) as (pg, rs):
        dsn = make_db(pg)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(LOAD)
            conn.execute("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@x', 'seed', i %% 100 "
                         "FROM generate_series(1, %s) i", (total,))
            conn.execute("VACUUM ANALYZE users")
        prefix = unique("e2e") + ":"
        data = config_dict(dsn, rs.url, unique("s"), prefix)
        daemon = (DaemonProcess(data, root=args.root) if args.root else DaemonProcess(data)).start()
        daemon.wait_ready()
        sub = Subscriber(rs.url, prefix)
        spy = None
        if args.py_spy:
            import subprocess

            assert daemon.proc is not None
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(daemon.proc.pid),
                                    "-r", "250", "--format", "raw", "-o", str(args.py_spy), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"machine: {machine()}")
        print(f"daemon: cdcd run ({args.root or 'this checkout'}) in a subprocess; load: {args.writers} "
              f"server-side generator backends (nice {args.nice_load}); "
              f"synchronous_commit={args.synchronous_commit}; {args.seconds:.0f}s per step")
        assert daemon.proc is not None and rs.proc is not None
        meter = CpuMeter(dsn, {"daemon": daemon.proc.pid, "redis": rs.proc.pid, "bench (subscribers)": os.getpid()})
        rows, lag, cores = [], [], []
        first = 1
        try:
            for rate in rates:
                res = step(dsn, sub, first, rate, args.seconds, args.writers, max_rows, meter, args.nice_load)
                first += int(rate * args.seconds) if rate else max_rows
                label = f"{rate:,.0f}/s" if rate else "max"
                for name in ("applied", "backplane", "l1"):
                    p50, p95, p99, mx = res[name]
                    rows.append([label, f"{res['achieved']:,.0f}", name, f"{p50:.2f}", f"{p95:.2f}", f"{p99:.2f}",
                                 f"{mx:.1f}", res[name + "_missing"], "yes" if res["sustained"] else "NO"])
                lag.append((label, res["per_second"]))
                cores.append((label, res["cores"]))
        finally:
            if spy is not None:
                import signal

                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            sub.close()
            print(visibility_summary(daemon))
            daemon.stop()
            lines = batch_lines(daemon.events())
            if lines:
                n = sum(int(e.get("batches", 1)) for e in lines)
                changes = sum(int(e["changes"]) for e in lines)
                redis_ms = sum(float(e["redis_ms"]) * int(e.get("batches", 1)) for e in lines) / n
                print(f"daemon: {n} batches, {changes / n:.1f} changes per batch on average; Redis time per batch "
                      f"(send + wait for replies) mean {redis_ms:.2f} ms, max "
                      f"{max(float(e.get('redis_ms_max', e['redis_ms'])) for e in lines):.2f} ms")
        print(table(["target", "achieved/s", "stage", "p50 ms", "p95 ms", "p99 ms", "max ms", "missing",
                     "sustained"], rows))
        print("\nCPU used during each step, in cores (2 available)")
        for label, used in cores:
            print(f"{label:>9}: " + ", ".join(f"{k} {v:.2f}" for k, v in used.items())
                  + f"; total {sum(used.values()):.2f}")
        print("\nlag over time (backplane latency of the changes committed in each second: count p50/p99 ms)")
        for label, secs in lag:
            print(f"{label:>9}: " + "  ".join(f"{s}s:{n} {p50:.1f}/{p99:.1f}" for s, n, p50, p99 in secs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
