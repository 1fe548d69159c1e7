"""Daemon-side cost of turning a batch into RESP (``RedisSink._send_packed``), this tree vs another revision.

Usage::

    .venv/bin/python bench/apply_pack_micro.py --base-rev REV [--rounds 3] [--entries 4000] [--reps 150]

The packing alone, without Redis: the sink writes to a connection that discards the bytes. One batch of
``--entries`` value writes (a users row of 104 bytes each, with a table tag snapshot), keys as in the
example rules (``user:<id>``) or hash-tagged by tenant (``{t<id % 100>}:user:<id>``, where ``apply_many``
groups them), packed ``--reps`` times; the minimum and the median per entry, in microseconds. Each
(tree, keys) pair runs in a process of its own (``--base-rev`` exported with ``git archive``), and the
rounds alternate the trees.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROW = b'{"id":1,"email":"u1@example.com","name":"name 1","tenant_id":7,"updated_at":"2026-12-05T08:00:00+00:00"}'


def worker(tagged: bool, entries: int, reps: int) -> None:
    """Runs with the tree under test first on sys.path (PYTHONPATH); prints ``min median``."""
    import redis
    import yaml
    from redis.connection import Connection

    from cdcd.backplane import Sequencer
    from cdcd.config import parse_config
    from cdcd.rules import Batch, Write
    from cdcd.sinks.redis import RedisSink

    data = yaml.safe_load((Path(os.environ["PYTHONPATH"]) / "config" / "cdcd.example.yaml").read_text())
    data["source"].update({"dsn": "postgresql://unused/none", "slot": "x", "publication": "x"})
    data["redis"] = {"url": "redis://127.0.0.1:1/0"}
    data["keyspace"] = {"prefix": "p:"}
    rules = parse_config(yaml.safe_dump(data), "bench.yaml").rules()

    class Discard(Connection):
        def connect(self, *a: Any, **k: Any) -> None:
            pass

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            pass

        def disconnect(self, *a: Any, **k: Any) -> None:
            pass

    sink = RedisSink(redis.Redis(), rules, Sequencer("cdcd"))
    sink._conn = Discard()
    tag = next(iter(rules.by_relation.values())).table_tag
    sink.epochs.set(tag, "1733380000000000")
    batch = Batch()
    for i in range(entries):
        key = f"{{t{i % 100}}}:user:{i}" if tagged else f"user:{i}"
        batch.put(Write(rules.keyspace.entry(key), 1000, ROW, 600_000, table_tag=tag))
    batch.version = 1000
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sink._send_packed(batch)
        out.append((time.perf_counter() - t0) / entries * 1e6)
    print(f"{min(out)} {statistics.median(out)}")


def export(rev: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="cdcd-base-"))
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-rev", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--entries", type=int, default=4000)
    ap.add_argument("--reps", type=int, default=150)
    ap.add_argument("--worker", choices=["example", "tagged"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker == "tagged", args.entries, args.reps)
        return
    if not args.base_rev:
        ap.error("--base-rev is required")
    base = export(args.base_rev)
    trees = [(f"base {args.base_rev}", base), ("this tree", ROOT)]
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for name, tree in trees if rnd % 2 == 0 else trees[::-1]:
                for keys in ("example", "tagged"):
                    res = subprocess.run([sys.executable, __file__, "--worker", keys, "--entries", str(args.entries),
                                          "--reps", str(args.reps)], capture_output=True, text=True, check=True,
                                         env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
                    lo, med = map(float, res.stdout.split())
                    got.setdefault((keys, name), []).append((lo, med))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import table

    rows = [[keys, name, f"{min(g[0] for g in v):.2f}", f"{statistics.median(g[1] for g in v):.2f}"]
            for (keys, name), v in sorted(got.items())]
    print(f"{args.entries} value writes per batch, {args.reps} packings per process, {args.rounds} rounds; "
          f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(table(["keys", "tree", "min us/entry", "median us/entry"], rows))


if __name__ == "__main__":
    main()
