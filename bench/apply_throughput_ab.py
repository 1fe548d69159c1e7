"""``bench/apply_throughput.py`` as an interleaved A/B: this tree's daemon against another revision's.

Usage::

    .venv/bin/python bench/apply_throughput_ab.py --base-rev REV [--rounds 3] [--changes 100000]
                                                  [--txn-size 10] [--max-batch 5000] [--tenant-tag]

One Postgres and one Redis; ``2 x --rounds`` slots are created before the fill, so every drain sees the
same WAL. Then, round by round, ``cdcd run`` of ``--base-rev`` (exported with ``git archive`` to a
temporary directory) and of this tree each drain a slot of their own (the order alternates per round),
each under its own key prefix, exactly as ``apply_throughput.py`` measures one drain: steady changes/s
from the daemon's batch log lines, wall time from process start, and the CPU seconds Redis, the daemon
and the walsender spent during the drain. Medians per variant are printed with every run.

``--tenant-tag`` prefixes the key templates with a hash tag, ``{{t{tenant_id}}}:`` (100 tenants), so that
the keys of one tenant share a Redis Cluster hash slot: the layout where ``apply_many`` groups entries.
Without it (the example rules) keys share a slot only by chance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import apply_throughput as at
from _common import ROOT, DaemonProcess, config_dict, heartbeat, load, machine, make_db, servers, table, unique


class TreeDaemon(DaemonProcess):
    """``cdcd run`` from another source tree (its ``cdcd`` package first on the path)."""

    tree: Path = ROOT

    def start(self) -> TreeDaemon:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.tree)}
        self.proc = subprocess.Popen([sys.executable, "-m", "cdcd.cli", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, cwd=self.tree, env=env)
        log.close()
        return self


def export(rev: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="cdcd-base-"))
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    return out


def tagged(data: dict[str, Any]) -> dict[str, Any]:
    for rule in data["tables"].values():
        rule["keys"] = ["{{t{tenant_id}}}:" + k for k in rule["keys"]]
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-rev", required=True, help="git revision of the baseline daemon")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--txn-size", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=5000)
    ap.add_argument("--tenant-tag", action="store_true", help="keys hash-tagged by tenant (see above)")
    args = ap.parse_args()
    base = export(args.base_rev)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    variants = [(f"base {args.base_rev}", base), (f"this tree ({head}+worktree)", ROOT)]
    at.DaemonProcess = TreeDaemon  # type: ignore[misc]  # run_daemon_process starts one of these
    from cdcd.sources.postgres import PostgresSource

    try:
        with servers() as (pg, rs):
            dsn = make_db(pg)
            r = redis.Redis.from_url(rs.url)
            runs: list[tuple[int, dict[str, Any], str]] = []
            for i in range(args.rounds * 2):
                data = config_dict(dsn, rs.url, unique("s"), unique("p") + ":", max_batch=args.max_batch)
                if args.tenant_tag:
                    data = tagged(data)
                cfg = load(data)
                PostgresSource(cfg.source, cfg.rules().source).setup()
                runs.append((i, data, data["keyspace"]["prefix"]))
            fill_s = at.fill(dsn, args.changes, args.txn_size)
            with psycopg.connect(dsn, autocommit=True) as conn:
                target = heartbeat(conn)
            print(f"machine: {machine()}")
            print(f"filled {args.changes} row changes ({args.txn_size}/txn) in {fill_s:.1f}s; "
                  f"max_batch {args.max_batch}; keys {'tagged by tenant' if args.tenant_tag else 'as in the example'}")
            rows = []
            results: dict[str, list[tuple[float, float, float, float]]] = {}
            assert rs.proc is not None
            for rnd in range(args.rounds):
                order = variants if rnd % 2 == 0 else variants[::-1]
                for j, (name, tree) in enumerate(order):
                    _, data, prefix = runs[rnd * 2 + j]
                    TreeDaemon.tree = tree
                    rate, wall, batches, cpu = at.run_daemon_process(data, r, prefix, target, 600, rs.proc.pid)
                    results.setdefault(name, []).append((rate, wall, cpu["redis"], cpu["daemon"]))
                    rows.append([rnd + 1, name, batches, f"{wall:.2f}", f"{rate:,.0f}", f"{cpu['redis']:.2f}",
                                 f"{cpu['daemon']:.2f}", f"{cpu['walsender']:.2f}"])
            print(table(["round", "daemon", "batches", "wall s", "changes/s", "Redis CPU s", "daemon CPU s",
                         "walsender CPU s"], rows))
            med = []
            for name, got in results.items():
                rate = statistics.median(g[0] for g in got)
                redis_us = statistics.median(g[2] for g in got) / args.changes * 1e6
                med.append([name, f"{rate:,.0f}", f"{statistics.median(g[1] for g in got):.2f}",
                            f"{redis_us:.2f}", f"{statistics.median(g[3] for g in got):.2f}"])
            print(table(["daemon (medians)", "changes/s", "wall s", "Redis CPU us/change", "daemon CPU s"], med))
            with contextlib.suppress(OSError):
                print("load average at end: " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
