"""Drain rate from a Kafka topic of Debezium events (the Kafka source), vs the same naive baseline.

Usage::

    .venv/bin/python bench/apply_throughput_kafka.py [--changes 200000] [--partitions 1] [--naive-seconds 15]

A tansu broker (in memory) and Redis are started; ``--changes`` schemaless Debezium envelopes are
produced first (the same rotating mix as ``apply_throughput.py``: insert user, insert order, update
user, update order; ``source.sequence`` increasing; one event per transaction, as Debezium emits them)
to ``bench.public.users`` / ``bench.public.orders``. Then ``cdcd run`` with ``source: {type: kafka}``,
in its own process, drains them in a fresh consumer group; the rate is measured between the first
and the last applied batch (from the daemon's batch log lines). The naive baseline reads the same topics with its
own group and the same parsing and rules, and sends one unpipelined ``DEL`` per key and ``INCR``
per tag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DaemonProcess,
    applied_version,
    config_dict,
    load,
    machine,
    steady_rate,
    table,
    unique,
    wait_until,
)

from cdcd.devservers import KafkaServer, RedisServer


def envelope(i: int) -> tuple[str, bytes, bytes]:
    k = i // 4
    step = i % 4
    lsn = 10_000 + i * 100
    src = {"connector": "postgresql", "schema": "public", "lsn": lsn, "sequence": f'["{lsn - 1}","{lsn}"]',
           "txId": 1000 + i,
           "ts_ms": int(time.time() * 1000)}
    user = {"id": k, "email": f"u{k}@example.com", "name": f"name {k}", "tenant_id": k % 100,
            "updated_at": "2026-01-01T00:00:00Z"}
    order = {"id": k, "user_id": k, "tenant_id": k % 100, "total": "1.25", "status": "new"}
    if step == 0:
        body = {"before": None, "after": user, "op": "c", "source": {**src, "table": "users"}}
    elif step == 1:
        body = {"before": None, "after": order, "op": "c", "source": {**src, "table": "orders"}}
    elif step == 2:
        body = {"before": user, "after": {**user, "name": f"renamed {k}"}, "op": "u",
                "source": {**src, "table": "users"}}
    else:
        body = {"before": order, "after": {**order, "status": "paid"}, "op": "u", "source": {**src, "table": "orders"}}
    topic = f"bench.public.{body['source']['table']}"  # type: ignore[index]
    return topic, json.dumps({"id": k}).encode(), json.dumps(body).encode()


def produce(bootstrap: str, n: int, partitions: int) -> float:
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("bench.public.users", partitions, 1), NewTopic("bench.public.orders", partitions, 1)])
    admin.close()
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=512 * 1024,
                      max_request_size=8 * 1024 * 1024)
    t0 = time.perf_counter()
    for i in range(n):
        topic, key, value = envelope(i)
        p.send(topic, key=key, value=value)
    p.flush()
    p.close(10)
    return time.perf_counter() - t0


def source_settings(bootstrap: str, group: str) -> Any:
    from cdcd.sources.kafka import KafkaSourceSettings

    return KafkaSourceSettings.model_validate({
        "bootstrap_servers": bootstrap, "group_id": group, "topics": ["bench.public.users", "bench.public.orders"],
        "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_records": 5000,
        "topic_options": {"bench.public.*": {"columns": {"updated_at": "timestamptz", "total": "decimal"}}},
    })


def run_daemon(data: dict[str, Any], r: redis.Redis, prefix: str, target: int) -> tuple[float, float, int]:
    """``cdcd run`` with the Kafka source in its own process: (steady changes/s, daemon CPU s, batches)."""
    d = DaemonProcess(data)
    d.start()
    assert d.proc is not None
    try:
        wait_until(lambda: applied_version(r, prefix) >= target, 900, interval=0.01, what="topics drained")
        fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        d.stop()
    steady, batches = steady_rate(d.events())
    return steady, cpu, batches


def run_naive(data: dict[str, Any], bootstrap: str, r: redis.Redis, n: int, budget: float) -> tuple[int, float]:
    from cdcd.change import Transaction
    from cdcd.sources.kafka import KafkaSource

    rules = load(data).rules()
    source = KafkaSource(source_settings(bootstrap, unique("naive")))
    source.connect()
    done = 0
    t0 = 0.0
    try:
        while done < n and (not t0 or time.perf_counter() - t0 < budget):
            items = source.poll(0.5)
            if items and not t0:
                t0 = time.perf_counter()  # after the group join, which is not the baseline's fault
            for item in items:
                if isinstance(item, Transaction):
                    batch = rules.plan([item])
                    for key in batch.writes:
                        r.delete(key)
                    for tag in batch.tags:
                        r.incr(rules.keyspace.tag(tag))
                    done += len(item.changes)
            source.ack([it.position for it in items])
    finally:
        source.close()
    return done, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--naive-seconds", type=float, default=15.0)
    args = ap.parse_args()
    kafka = KafkaServer()
    kafka.start()
    rs = RedisServer()
    rs.start()
    try:
        r = redis.Redis.from_url(rs.url)
        secs = produce(kafka.bootstrap, args.changes, args.partitions)
        print(f"machine: {machine()}")
        print(f"produced {args.changes} Debezium events to 2 topics x {args.partitions} partition(s) in {secs:.1f}s")
        prefix = unique("k") + ":"
        data = config_dict("postgresql://unused", rs.url, "unused", prefix)
        data["source"] = {"type": "kafka", **source_settings(kafka.bootstrap, unique("g")).model_dump(
            mode="json", include={"bootstrap_servers", "group_id", "topics", "session_timeout_ms",
                                  "heartbeat_interval_ms", "max_poll_records", "topic_options"})}
        data["daemon"]["dead_letters"] = "redis"
        target = 10_000 + (args.changes - 1) * 100
        rate, cpu, batches = run_daemon(data, r, prefix, target)
        done, nsecs = run_naive(config_dict("postgresql://unused", rs.url, "unused", unique("kn") + ":"),
                                kafka.bootstrap, r, args.changes, args.naive_seconds)
        naive = done / nsecs if nsecs else 0.0
        print(table(["variant", "changes", "batches", "changes/s"], [
            ["cdcd run, Kafka source (subprocess)", args.changes, batches, f"{rate:,.0f}"],
            ["naive DEL/INCR per key, Kafka source", done, "-", f"{naive:,.0f}"]]))
        if naive:
            print(f"speed-up over naive: {rate / naive:.1f}x")
        print(f"daemon CPU seconds for the run (start-up and group join included): {cpu:.2f}")
    finally:
        rs.stop()
        kafka.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
