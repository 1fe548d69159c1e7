"""Drain rate of ``cdcd run`` from Kafka topics of Debezium JSON (the Kafka source), per CRC and fetch setting.

Usage::

    .venv/bin/python bench/apply_throughput_kafka.py [--changes 200000] [--partitions 1] [--repeats 3] \\
        [--crc pure,native] [--client kafka-python,confluent] [--fetch-max-wait-ms 500,30] \\
        [--max-poll-records 500,5000] [--no-schemas] [--profile DIR] [--naive-seconds 0] \\
        [--root before=/path/to/checkout ...]

A tansu broker (in memory) and Redis are started; ``--changes`` Debezium envelopes are produced once
(the rotating mix of ``apply_throughput.py``: insert user, insert order, update user, update order; one
event per transaction as Debezium emits them, ``source.sequence`` increasing). By default they carry
their schema (``value.converter.schemas.enable=true``, the format cdcd wants), built from records the
real connector wrote (``tests/kafka/debezium_interleaved.json``). Then, for every combination of
``--crc``, ``--fetch-max-wait-ms`` and ``--max-poll-records``, ``cdcd run`` (its own process) drains
the *same* topics in a fresh consumer group under a fresh keyspace; the combinations run interleaved
``--repeats`` times and the table gives medians.

``--crc pure`` runs the daemon with the ``crc32c`` package hidden (``sys.modules["crc32c"] = None``),
which is what kafka-python sees on a machine without it; the bench checks the daemon then logged
``kafka_crc32c_pure_python`` (and did not with ``native``).

Drain detection reads the group's committed offsets (the daemon commits only what Redis acknowledged),
so it does not depend on versions or on the daemon's log lines. The rate is taken from the first
commit seen to the last (the group join and the first batch are not counted); daemon CPU is
measured over the same window from ``/proc``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DaemonProcess, config_dict, load, machine, table, unique, wait_until

from cdcd.devservers import KafkaServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
CAPTURED = ROOT / "tests" / "kafka" / "debezium_interleaved.json"
TOPICS = ["bench.public.users", "bench.public.orders"]

BOOT = """# written by bench/apply_throughput_kafka.py: ``cdcd run`` with or without the C crc32c
import sys
if {pure!r}:
    sys.modules["crc32c"] = None  # kafka-python falls back to its pure-Python CRC, as without the package
from cdcd.cli import main
main(sys.argv[1:])
"""


# ------------------------------------------------------------------------------ the events


def _schemas() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """table -> (value schema, key schema) as the real Postgres connector wrote them."""
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for rec in json.loads(CAPTURED.read_text()):
        table_ = rec["topic"].rsplit(".", 1)[1]
        if rec["value"] and table_ not in out:
            out[table_] = (json.loads(rec["value"])["schema"], json.loads(rec["key"])["schema"])
    return out


def _decimal(text: str, scale: int) -> str:
    """``decimal.handling.mode=precise``: base64 of the unscaled big-endian two's complement integer."""
    unscaled = int(text.replace(".", "")) if "." in text else int(text) * 10**scale
    return base64.b64encode(unscaled.to_bytes((unscaled.bit_length() + 8) // 8 or 1, "big", signed=True)).decode()


class Events:
    """The i-th event of the mix, with or without schemas."""

    def __init__(self, schemas: bool) -> None:
        self.schemas = _schemas() if schemas else None

    def __call__(self, i: int) -> tuple[str, bytes, bytes]:
        k = i // 4
        step = i % 4
        lsn = 10_000 + i * 100
        now = int(time.time() * 1000)
        src = {"version": "3.6.3.Final", "connector": "postgresql", "name": "bench", "ts_ms": now,
               "snapshot": "false", "db": "bench", "sequence": f'["{lsn - 1}","{lsn}"]', "ts_us": now * 1000,
               "ts_ns": now * 1_000_000, "schema": "public", "txId": 1000 + i, "lsn": lsn, "xmin": None,
               "origin": None, "origin_lsn": None}
        user = {"id": k, "email": f"u{k}@example.com", "name": f"name {k}", "tenant_id": k % 100,
                "updated_at": "2026-01-01T00:00:00.000000Z"}
        total = _decimal("1.25", 2) if self.schemas else "1.25"
        order = {"id": k, "user_id": k, "tenant_id": k % 100, "total": total, "status": "new"}
        if step == 0:
            table_, before, after, op = "users", None, user, "c"
        elif step == 1:
            table_, before, after, op = "orders", None, order, "c"
        elif step == 2:
            table_, before, after, op = "users", user, {**user, "name": f"renamed {k}"}, "u"
        else:
            table_, before, after, op = "orders", order, {**order, "status": "paid"}, "u"
        payload = {"before": before, "after": after, "source": {**src, "table": table_}, "transaction": None,
                   "op": op, "ts_ms": now, "ts_us": now * 1000, "ts_ns": now * 1_000_000}
        key: dict[str, Any] = {"id": k}
        if self.schemas is not None:
            value_schema, key_schema = self.schemas[table_]
            payload = {"schema": value_schema, "payload": payload}
            key = {"schema": key_schema, "payload": key}
        return f"bench.public.{table_}", json.dumps(key).encode(), json.dumps(payload).encode()


def produce(bootstrap: str, n: int, partitions: int, events: Events) -> tuple[float, int]:
    """(seconds, mean value bytes)."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(t, partitions, 1) for t in TOPICS])
    admin.close()
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=512 * 1024,
                      max_request_size=8 * 1024 * 1024)
    t0 = time.perf_counter()
    size = 0
    for i in range(n):
        topic, key, value = events(i)
        size += len(value)
        p.send(topic, key=key, value=value)
    p.flush()
    p.close(10)
    return time.perf_counter() - t0, size // max(1, n)


# ------------------------------------------------------------------------------ one daemon run


def source_settings(bootstrap: str, group: str, schemas: bool, wait_ms: int, max_poll: int,
                    client: str = "kafka-python") -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "kafka", "bootstrap_servers": [bootstrap], "group_id": group, "topics": TOPICS,
        "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_records": max_poll,
        "fetch_max_wait_ms": wait_ms}
    if client != "kafka-python":
        data["client"] = client
    if not schemas:
        data["topic_options"] = {"bench.public.*": {"columns": {"updated_at": "timestamptz", "total": "decimal"}}}
    return data


def committed_total(admin: Any, group: str) -> int:
    # kafka-python 3 renamed list_consumer_group_offsets to list_group_offsets
    call = getattr(admin, "list_group_offsets", None) or admin.list_consumer_group_offsets
    try:
        offsets = call(group)
    except Exception:
        return 0  # the group does not exist yet
    if group in offsets:  # kafka-python 3: {group: {tp: OffsetAndMetadata}}
        offsets = offsets[group]
    return sum(max(0, o.offset) for o in offsets.values())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class KafkaDaemon(DaemonProcess):
    """``cdcd run`` started through a boot file that can hide ``crc32c``, optionally under pyinstrument."""

    def __init__(self, data: dict[str, Any], pure: bool, profile: Path | None, code: Path = ROOT) -> None:
        super().__init__(data)
        self.boot = self.workdir / "boot.py"
        self.boot.write_text(BOOT.format(pure=pure))
        self.profile = profile
        self.code = code

    def start(self) -> KafkaDaemon:
        prof = ["-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(self.profile)] if self.profile else []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *prof, str(self.boot), "run", "--config", str(self.config_path)],
                stdout=log, stderr=log, cwd=self.code,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.code)})
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60 if self.profile else 15)  # pyinstrument writes its report at exit
            except subprocess.TimeoutExpired:
                self.kill()


class Variant(NamedTuple):
    crc: str  # pure, native, or baseline (the --baseline code, pure CRC, its own fetch defaults)
    wait_ms: int
    max_poll: int
    root: str = ""  # a --root name: that checkout's code with the same settings ("" = this tree)
    client: str = "kafka-python"  # source.client

    def label(self) -> str:
        if self.crc == "baseline":
            return f"before: --baseline code, pure CRC, fetch_max_wait_ms 500, max_poll_records {self.max_poll}"
        where = f"{self.root or 'this'}: " if self.root or _ROOTS else ""
        client = f"client={self.client}, " if self.client != "kafka-python" or len(_CLIENTS) > 1 else ""
        crc = f"crc={self.crc}, " if self.client == "kafka-python" else ""
        return f"{where}{client}{crc}fetch_max_wait_ms={self.wait_ms}, max_poll_records={self.max_poll}"


_ROOTS: dict[str, Path] = {}  # --root NAME=DIR
_CLIENTS: list[str] = []  # --client


def run_daemon(args: argparse.Namespace, bootstrap: str, redis_url: str, crc: str, wait_ms: int, max_poll: int,
               profile: Path | None, baseline: bool = False, code: Path = ROOT,
               client: str = "kafka-python") -> dict[str, float]:
    """One drain; ``baseline``: the code in ``--baseline`` with its own fetch defaults (it may not know them)."""
    from kafka import KafkaAdminClient

    group = unique("g")
    data = config_dict("postgresql://unused", redis_url, "unused", unique("k") + ":")
    data["source"] = source_settings(bootstrap, group, args.schemas, wait_ms, max_poll, client)
    if baseline:
        del data["source"]["fetch_max_wait_ms"]
    data["daemon"]["dead_letters"] = "redis"
    d = KafkaDaemon(data, crc == "pure", profile, args.baseline if baseline else code)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    d.start()
    assert d.proc is not None
    pid = d.proc.pid
    try:
        first = wait_until(lambda: committed_total(admin, group), 120, interval=0.02, what="first commit")
        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        n = first
        deadline = time.monotonic() + 900
        while n < args.changes:
            if time.monotonic() > deadline or d.proc.poll() is not None:
                raise RuntimeError(f"drain stopped at {n} of {args.changes} ({d.log_path})")
            time.sleep(0.02)
            n = committed_total(admin, group)
        t1, cpu1 = time.perf_counter(), cpu_seconds(pid)
    finally:
        d.stop()
        admin.close()
    warned = any(e.get("event") == "kafka_crc32c_pure_python" for e in d.events())
    if not baseline and client == "kafka-python" and warned != (crc == "pure"):
        raise RuntimeError(f"crc {crc}: daemon warned={warned} ({d.log_path})")
    span = t1 - t0
    return {"rate": (args.changes - first) / span, "cores": (cpu1 - cpu0) / span,
            "cpu_us": (cpu1 - cpu0) / max(1, args.changes - first) * 1e6}


# ------------------------------------------------------------------------------ the naive baseline


def run_naive(args: argparse.Namespace, bootstrap: str, redis_url: str) -> float:
    """One unpipelined DEL per key and INCR per tag, same parsing and rules (a floor, not a target)."""
    from cdcd.change import Transaction
    from cdcd.sources.kafka import KafkaSource

    data = config_dict("postgresql://unused", redis_url, "unused", unique("kn") + ":")
    rules = load(data).rules()
    r = redis.Redis.from_url(redis_url)
    settings = source_settings(bootstrap, unique("naive"), args.schemas, 30, 5000)
    source = KafkaSource.from_settings(settings)
    source.connect()
    done = 0
    t0 = 0.0
    try:
        while done < args.changes and (not t0 or time.perf_counter() - t0 < args.naive_seconds):
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
    return done / (time.perf_counter() - t0) if t0 else 0.0


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--crc", default="native", help="comma list of pure, native (kafka-python's CRC)")
    ap.add_argument("--client", default="kafka-python", help="comma list of kafka-python, confluent (source.client)")
    ap.add_argument("--fetch-max-wait-ms", default="30", help="comma list of fetch_max_wait_ms values")
    ap.add_argument("--max-poll-records", default="5000", help="comma list of max_poll_records values")
    ap.add_argument("--no-schemas", dest="schemas", action="store_false",
                    help="schemaless envelopes (schemas.enable=false) with column hints")
    ap.add_argument("--profile", type=Path, help="directory: one extra pyinstrument run per variant, reports there")
    ap.add_argument("--baseline", type=Path,
                    help="a checkout of the code before (e.g. git archive main); adds its variant, pure CRC, run "
                         "with its own defaults (kafka-python's fetch_max_wait_ms 500)")
    ap.add_argument("--naive-seconds", type=float, default=0.0, help="also run the naive baseline this long")
    ap.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                    help="also run every variant with the code of checkout DIR (e.g. a worktree of main), same "
                         "settings, alternating with this tree's runs (repeatable)")
    args = ap.parse_args()
    for spec in args.root:
        name, _, where = spec.partition("=")
        if not where:
            ap.error("--root takes NAME=DIR")
        _ROOTS[name] = Path(where).resolve()
    crcs = [c.strip() for c in args.crc.split(",") if c.strip()]
    if not set(crcs) <= {"pure", "native"}:
        ap.error("--crc takes pure and/or native")
    waits = [int(w) for w in args.fetch_max_wait_ms.split(",")]
    polls = [int(m) for m in args.max_poll_records.split(",")]
    variants = [Variant("baseline", 500, polls[0])] if args.baseline else []
    _CLIENTS.extend(k.strip() for k in args.client.split(",") if k.strip())
    if not set(_CLIENTS) <= {"kafka-python", "confluent"}:
        ap.error("--client takes kafka-python and/or confluent")
    # --root checkouts run with kafka-python only: checkouts before source.client do not know the setting
    variants += [Variant(c if k == "kafka-python" else "native", w, m, r, k) for r in ["", *_ROOTS]
                 for k in (_CLIENTS if not r else ["kafka-python"])
                 for c in (crcs if k == "kafka-python" else crcs[:1]) for w in waits for m in polls]
    kafka = KafkaServer()
    kafka.start()
    rs = RedisServer()
    rs.start()
    try:
        secs, size = produce(kafka.bootstrap, args.changes, args.partitions, Events(args.schemas))
        print(f"machine: {machine()}")
        print(f"uptime before: {uptime()}")
        print(f"produced {args.changes} Debezium events ({'with' if args.schemas else 'without'} schemas, "
              f"{size} bytes each on average) to 2 topics x {args.partitions} partition(s) in {secs:.1f}s")
        results: dict[Variant, list[dict[str, float]]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: no fixed first slot
            for v in order:
                base_ = v.crc == "baseline"
                res = run_daemon(args, kafka.bootstrap, rs.url, "pure" if base_ else v.crc, v.wait_ms, v.max_poll,
                                 None, baseline=base_, code=_ROOTS.get(v.root, ROOT), client=v.client)
                results[v].append(res)
                print(f"  run {rep + 1}: {v.label()}: {res['rate']:,.0f} changes/s, {res['cores']:.2f} cores, "
                      f"{res['cpu_us']:.1f} CPU µs/change", flush=True)
        rows = []
        base = statistics.median(r["rate"] for r in results[variants[0]])
        for v in variants:
            rates = [r["rate"] for r in results[v]]
            med = statistics.median(rates)
            rows.append([v.label(), len(rates), f"{med:,.0f}",
                         f"{min(rates):,.0f}-{max(rates):,.0f}",
                         f"{statistics.median(r['cores'] for r in results[v]):.2f}",
                         f"{statistics.median(r['cpu_us'] for r in results[v]):.1f}", f"{med / base:.2f}x"])
        print(table(["cdcd run, Kafka source", "runs", "median changes/s", "range", "daemon cores",
                     "CPU µs/change", "vs first"], rows))
        if args.naive_seconds:
            print(f"naive DEL/INCR per key: {run_naive(args, kafka.bootstrap, rs.url):,.0f} changes/s")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for v in variants:
                if v.crc == "baseline" or v.root:
                    continue
                out = args.profile / f"kafka-{v.client}-{v.crc}-{v.wait_ms}-{v.max_poll}.txt"
                run_daemon(args, kafka.bootstrap, rs.url, v.crc, v.wait_ms, v.max_poll, out, client=v.client)
                print(f"profile: {out}")
        print(f"uptime after: {uptime()}")
    finally:
        rs.stop()
        kafka.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
