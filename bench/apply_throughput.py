"""How fast does the daemon drain a replication slot that already holds N row changes?

Usage::

    .venv/bin/python bench/apply_throughput.py [--changes 200000] [--txn-size 10] [--naive-seconds 15]
                                               [--max-batch 5000] [--profile FILE] [--inprocess]

With the daemon stopped, a server-side procedure commits ``--changes`` row changes
(a rotating mix over the example schema: insert user, insert order, update user's
name, update order's status; ``--txn-size`` changes per transaction) into two
slots. Then:

* **cdcd**: ``cdcd run`` in its own process drains slot A; the rate is the
  changes of every batch after the first divided by the time between the first
  and the last batch (from the daemon's own batch log lines); the wall time from
  process start is printed too.
* **naive**: in this process, the same source and the same rules drain slot B,
  but every key is a separate unpipelined ``DEL`` and every tag a separate
  ``INCR`` (classic delete-on-write with one redis-py call per key), for at most
  ``--naive-seconds``.

``--profile FILE`` runs the daemon in this process instead, in the main thread
under pyinstrument, and writes the text profile to FILE.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
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

FILL = """
CREATE OR REPLACE PROCEDURE bench_fill(n int, per_txn int) LANGUAGE plpgsql AS $$
DECLARE k int;
BEGIN
  FOR i IN 0..n - 1 LOOP
    k := i / 4;
    CASE i % 4
      WHEN 0 THEN INSERT INTO users VALUES (k, 'u' || k || '@example.com', 'name ' || k, k % 100, now());
      WHEN 1 THEN INSERT INTO orders VALUES (k, k, k % 100, k * 1.25, 'new');
      WHEN 2 THEN UPDATE users SET name = 'renamed ' || k WHERE id = k;
      ELSE UPDATE orders SET status = 'paid' WHERE id = k;
    END CASE;
    IF (i + 1) % per_txn = 0 THEN COMMIT; END IF;
  END LOOP;
  COMMIT;
END $$;
"""


def fill(dsn: str, n: int, per_txn: int) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FILL)
        t0 = time.perf_counter()
        conn.execute("CALL bench_fill(%s, %s)", (n, per_txn))
        return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def walsender_pid(dsn: str, slot: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return int(row[0]) if row and row[0] else None


def summarize_collapsed(path: Path, top: int = 25) -> str:
    """Self and total sample share per function from py-spy's collapsed stacks."""
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + n
    out = [f"{samples} samples; self% / total% per function"]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / samples:6.1f}% {100 * total_n[f] / samples:6.1f}%  {f}")
    return "\n".join(out)


def run_daemon_process(data: dict[str, Any], r: redis.Redis, prefix: str, target: int, timeout: float,
                       redis_pid: int, spy: Path | None = None,
                       root: Path | None = None) -> tuple[float, float, int, dict[str, float]]:
    """(steady changes/s from the batch log, wall seconds from process start, batches, CPU seconds by process).

    ``root``: run the cdcd of another checkout (before/after comparisons)."""
    d = DaemonProcess(data) if root is None else DaemonProcess(data, root=root)
    t0 = time.monotonic()
    d.start()
    assert d.proc is not None
    spy_proc = None
    if spy is not None:
        spy_proc = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(d.proc.pid),
                                     "-r", "250", "--format", "raw", "-o", str(spy), "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu: dict[str, float] = {}
    redis_before = cpu_seconds(redis_pid)
    try:
        wait_until(lambda: walsender_pid(data["source"]["dsn"], data["source"]["slot"]), 30, interval=0.005)
        wal_pid = walsender_pid(data["source"]["dsn"], data["source"]["slot"])
        wal_before = cpu_seconds(wal_pid) if wal_pid else 0.0
        cpu["daemon_started"] = cpu_seconds(d.proc.pid)  # imports and startup: not the drain's cost
        wait_until(lambda: applied_version(r, prefix) >= target, timeout, interval=0.005, what="slot drained")
        wall = time.monotonic() - t0
        cpu["daemon"] = cpu_seconds(d.proc.pid)
        cpu["walsender"] = cpu_seconds(wal_pid) - wal_before if wal_pid else float("nan")
        cpu["redis"] = cpu_seconds(redis_pid) - redis_before
    finally:
        if spy_proc is not None:
            spy_proc.send_signal(signal.SIGINT)
            spy_proc.wait(30)
        d.stop()
    steady, batches = steady_rate(d.events())
    return steady, wall, batches, cpu


def run_daemon_profiled(data: dict[str, Any], r: redis.Redis, prefix: str, target: int, out: Path,
                        n: int) -> tuple[float, int]:
    from pyinstrument import Profiler

    from cdcd.daemon import Daemon
    from cdcd.logs import configure

    configure("json", "warning")
    daemon = Daemon(load(data))
    counted = {"batches": 0, "changes": 0, "first": 0.0, "last": 0.0}

    def on_batch(batch: Any, _result: Any) -> None:
        now = time.perf_counter()
        if not counted["batches"]:
            counted["first"] = now
        else:
            counted["changes"] += sum(batch.counts.values())
        counted["batches"] += 1
        counted["last"] = now

    daemon.on_batch = on_batch

    def watch() -> None:
        wait_until(lambda: applied_version(r, prefix) >= target, 600, interval=0.005)
        daemon.stop()

    threading.Thread(target=watch, daemon=True).start()
    profiler = Profiler(interval=0.0005)
    profiler.start()
    daemon.run()
    profiler.stop()
    out.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    span = counted["last"] - counted["first"]
    return (counted["changes"] / span if span > 0 else 0.0), int(counted["batches"])


def run_naive(data: dict[str, Any], r: redis.Redis, n: int, budget: float) -> tuple[int, float]:
    """Same source and rules, but one unpipelined redis-py call per key (DEL) and per tag (INCR)."""
    from cdcd.change import Transaction
    from cdcd.sources.postgres import PostgresSource

    config = load(data)
    rules = config.rules()
    ks = rules.keyspace
    source = PostgresSource(config.source, rules.source)
    source.connect()
    done = 0
    t0 = time.perf_counter()
    try:
        while done < n and time.perf_counter() - t0 < budget:
            items = source.poll(0.2)
            for item in items:
                if not isinstance(item, Transaction):
                    continue
                batch = rules.plan([item])
                for key in batch.writes:
                    r.delete(key)
                for tag in batch.tags:
                    r.incr(ks.tag(tag))
                done += len(item.changes)
                if time.perf_counter() - t0 >= budget:
                    break
            source.ack([it.position for it in items])
    finally:
        source.close()
    return done, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--txn-size", type=int, default=10, help="row changes per committed transaction")
    ap.add_argument("--max-batch", type=int, default=5000, help="source.max_batch for the daemon")
    ap.add_argument("--naive-seconds", type=float, default=15.0)
    ap.add_argument("--profile", type=Path, help="run the daemon in-process under pyinstrument; write text here")
    ap.add_argument("--py-spy", type=Path, help="sample the daemon subprocess with py-spy; collapsed stacks here")
    args = ap.parse_args()

    from cdcd.sources.postgres import PostgresSource

    with servers() as (pg, rs):
        dsn = make_db(pg)
        r = redis.Redis.from_url(rs.url)
        slot_a, slot_b = unique("a"), unique("b")
        prefix_a, prefix_b = unique("pa") + ":", unique("pb") + ":"
        data_a = config_dict(dsn, rs.url, slot_a, prefix_a, max_batch=args.max_batch)
        data_b = config_dict(dsn, rs.url, slot_b, prefix_b, max_batch=args.max_batch)
        for data in (data_a, data_b):  # publication + slot before the changes
            cfg = load(data)
            PostgresSource(cfg.source, cfg.rules().source).setup()
        fill_s = fill(dsn, args.changes, args.txn_size)
        with psycopg.connect(dsn, autocommit=True) as conn:
            target = heartbeat(conn)  # the daemon passes this only after every filled change
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint "
                               "FROM pg_replication_slots WHERE slot_name = %s", (slot_a,)).fetchone()
        print(f"machine: {machine()}")
        print(f"filled {args.changes} row changes in {args.changes // args.txn_size} transactions "
              f"({args.txn_size}/txn) in {fill_s:.1f}s; slot holds {wal[0] if wal else '?'} bytes of WAL")
        rows = []
        if args.profile:
            rate, batches = run_daemon_profiled(data_a, r, prefix_a, target, args.profile, args.changes)
            rows.append(["cdcd (in-process, profiled)", args.changes, batches, "-", f"{rate:,.0f}"])
            print(f"profile written to {args.profile}")
        else:
            assert rs.proc is not None
            rate, wall, batches, cpu = run_daemon_process(data_a, r, prefix_a, target, 600, rs.proc.pid, args.py_spy)
            if args.py_spy:
                print(summarize_collapsed(args.py_spy))
            rows.append(["cdcd (subprocess)", args.changes, batches, f"{wall:.2f}", f"{rate:,.0f}"])
            spent = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            print(f"CPU seconds during the drain (wall {wall:.2f}s, daemon start-up included): {spent}")
        done, secs = run_naive(data_b, r, args.changes, args.naive_seconds)
        naive = done / secs if secs else 0.0
        rows.append(["naive DEL/INCR per key (in-process)", done, "-", f"{secs:.2f}", f"{naive:,.0f}"])
        print(table(["variant", "changes", "batches", "wall s", "changes/s"], rows))
        print(f"speed-up over naive: {rate / naive:.1f}x" if naive else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
