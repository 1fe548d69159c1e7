"""What one ``batch`` log line per batch costs the daemon, against the summarising batch log (cdcd.batchlog).

Usage::

    .venv/bin/python bench/batch_log_cost.py [--batches 50000] [--repeats 5]

The daemon's structlog configuration (JSON lines, info, written to a file as under a process manager);
per batch: the old per-batch ``log.info("batch", ...)`` call with the same fields, and
``BatchLog.add`` with the default 1 s interval. Alternating repetitions; the minimum and the median
per batch are printed (contention only ever adds time), with the share of one core at a few batch
rates the daemon sees (a drain of 5 000-change batches: tens per second; 5 000 changes/s of
single-row transactions: ~600 per second; catching up on small transactions: thousands).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structlog
from _common import machine, table

from cdcd.batchlog import BatchLog
from cdcd.logs import configure


def per_line(log: Any, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        log.info("batch", txns=3, changes=8, writes=14, refused=0, tags=3, version=123456789 + i,
                 redis_ms=round(0.412345 * 1000, 2), lag_ms=round(0.0031 * 1000, 1))
    return (time.perf_counter() - t0) / n


def summarised(log: Any, n: int) -> float:
    bl = BatchLog(log.info, 1.0)
    t0 = time.perf_counter()
    for i in range(n):
        bl.add(3, 8, 14, 0, 3, 123456789 + i, 0.000412345, 3.1)
    bl.flush()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = tempfile.NamedTemporaryFile("w", prefix="cdcd-batchlog-", suffix=".log", delete=False)  # noqa: SIM115
    real_stderr = sys.stderr
    sys.stderr = out  # the JSON renderer prints to sys.stderr as configured
    try:
        configure("json", "info")
        log = structlog.get_logger("cdcd.daemon")
        times: dict[str, list[float]] = {"one line per batch": [], "summarised (1 line/s)": []}
        for _ in range(args.repeats):
            times["one line per batch"].append(per_line(log, args.batches))
            times["summarised (1 line/s)"].append(summarised(log, args.batches))
    finally:
        sys.stderr = real_stderr
        out.close()
    lines = sum(1 for _ in open(out.name))  # noqa: SIM115
    Path(out.name).unlink()
    print(f"machine: {machine()}")
    rows = []
    for name, ts in times.items():
        best, med = min(ts) * 1e6, statistics.median(ts) * 1e6
        rows.append([name, f"{best:.2f}", f"{med:.2f}",
                     *(f"{100 * rate * med / 1e6:.2f} %" for rate in (40, 600, 5000))])
    print(table(["batch log", "µs/batch (min)", "µs/batch (median)", "core @ 40/s", "core @ 600/s",
                 "core @ 5 000/s"], rows))
    print(f"({args.repeats} x {args.batches} batches per variant; {lines} lines written in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
