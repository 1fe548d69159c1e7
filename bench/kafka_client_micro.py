"""What kafka-python alone costs per Debezium record, before cdcd does anything with it.

Usage::

    .venv/bin/python bench/kafka_client_micro.py [--changes 60000] [--repeats 3] [--variants stock,recv256k,confluent]

A tansu broker (in memory) is started and ``--changes`` events of ``apply_throughput_kafka.py``'s mix
(Debezium JSON with schemas, ~3.5 KB) are produced to its two topics. Then each variant runs in a
process of its own: a bare ``KafkaConsumer`` with the Kafka source's settings (consumer group, manual
commits, ``fetch_max_wait_ms=30``, ``max_poll_records=5000``) polls until it has every record and
discards them. The figure is the process's CPU time (all threads: kafka-python's IO thread included)
from the first record to the last, per record.

Variants: ``stock`` is kafka-python as installed; ``recv256k`` replaces its transport's receive loop
(``recv(4096)`` per call, hard-coded) by one reading up to 256 KiB per call, to measure what the
receive size costs; ``confluent`` is confluent-kafka (librdkafka) with the configuration
``source.client: confluent`` gives it (``consume(5000)``, each message's offset, key and value read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, table
from apply_throughput_kafka import TOPICS, Events, produce

from cdcd.devservers import KafkaServer

CONSUMER = textwrap.dedent('''
    import json, resource, sys, time
    from kafka import KafkaConsumer
    bootstrap, group, n, variant = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if variant == "recv256k":
        import errno
        import kafka.errors as Errors
        from kafka.net.transport import KafkaTCPTransport

        def _sock_recv(self):
            recvd, err = [], None
            while True:
                try:
                    data = self._sock.recv(262144)
                    if not data:
                        err = Errors.KafkaConnectionError("socket disconnected")
                        break
                    recvd.append(data)
                except (BlockingIOError, InterruptedError):
                    break
                except BaseException as e:
                    err = Errors.KafkaConnectionError(e)
                    break
            return b"".join(recvd), err

        KafkaTCPTransport._sock_recv = _sock_recv
    got = 0
    t0 = None
    if variant == "confluent":
        from confluent_kafka import Consumer
        from cdcd.sources.kafka_confluent_consumer import consumer_config
        from cdcd.sources.settings import KafkaSourceSettings
        conf = consumer_config(KafkaSourceSettings(bootstrap_servers=[bootstrap], group_id=group,
                                                   topics=json.loads(sys.argv[5]), client="confluent"))
        c = Consumer(conf)
        c.subscribe(json.loads(sys.argv[5]))
        while got < n:
            msgs = c.consume(5000, 1.0)
            if msgs and t0 is None:
                t0 = resource.getrusage(resource.RUSAGE_SELF)
                first = len(msgs)
            for m in msgs:
                m.offset(), m.key(), m.value()
            got += len(msgs)
        t1 = resource.getrusage(resource.RUSAGE_SELF)
        c.close()
    else:
        c = KafkaConsumer(*json.loads(sys.argv[5]), bootstrap_servers=bootstrap, group_id=group,
                          enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=30,
                          max_poll_records=5000)
        while got < n:
            batch = c.poll(timeout_ms=1000)
            for recs in batch.values():
                if t0 is None:
                    t0 = resource.getrusage(resource.RUSAGE_SELF)
                    first = len(recs)
                got += len(recs)
        t1 = resource.getrusage(resource.RUSAGE_SELF)
        c.close(autocommit=False)
    cpu = (t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime)
    print(json.dumps({"records": got - first, "cpu": cpu}))
''')


def consume(bootstrap: str, n: int, variant: str, run: int) -> float:
    out = subprocess.run([sys.executable, "-c", CONSUMER, bootstrap, f"micro-{variant}-{run}-{time.time_ns()}",
                          str(n), variant, json.dumps(TOPICS)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return float(res["cpu"]) / max(1, int(res["records"])) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="stock,recv256k,confluent")
    args = ap.parse_args()
    variants = args.variants.split(",")
    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    kafka = KafkaServer()
    kafka.start()
    try:
        secs, size = produce(kafka.bootstrap, args.changes, 1, Events(True))
        print(f"produced {args.changes} events ({size} bytes each on average) in {secs:.1f}s")
        results: dict[str, list[float]] = {v: [] for v in variants}
        for run in range(args.repeats):
            for v in (variants if run % 2 == 0 else variants[::-1]):
                us = consume(kafka.bootstrap, args.changes, v, run)
                results[v].append(us)
                print(f"  run {run + 1}: {v}: {us:.1f} CPU µs/record", flush=True)
    finally:
        kafka.stop()
    rows = [[v, len(r), f"{statistics.median(r):.1f}", f"{min(r):.1f}-{max(r):.1f}"] for v, r in results.items()]
    print(table(["Kafka client alone", "runs", "median CPU µs/record", "range"], rows))
    print(f"load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
