"""L1 memory: bytes the L1 counts vs the RSS it really grows by, per value shape.

    .venv/bin/python bench/l1_memory.py                 # the table, every shape
    .venv/bin/python bench/l1_memory.py --shape row     # one shape, one JSON line (used by the test)

Each shape runs in a fresh subprocess: an empty ``L1`` with no limits, RSS read from
``/proc/self/statm`` after a ``gc.collect()``, then ``n`` entries put the way the client
builds them (value deserialized from its serialized form, two tags: one per entry, one
shared table tag; a generation string), RSS read again. ``ratio`` = counted / RSS growth:
``l1_max_bytes`` holds within 1.5x when it is between 0.67 and 1.5.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# shape -> (entries, builder of the i-th value); sized so that each run grows RSS by ~20-90 MiB
SHAPES: dict[str, tuple[int, Callable[[int], Any]]] = {
    "row": (100_000, lambda i: {"id": i, "email": f"u{i}@example.com", "name": f"name {i}", "tenant_id": i % 10,
                                "updated_at": "2026-12-01T17:56:19.123456+00:00"}),
    "short-str": (100_000, lambda i: f"value-{i:08d}"),
    "int-list": (100_000, lambda i: [i + k for k in range(10)]),
    "float-row": (100_000, lambda i: {"id": i, "price": i * 1.5, "ratio": i / 7, "ok": True, "note": None}),
    "orders-20": (20_000, lambda i: [{"line": k, "sku": f"sku-{i}-{k}", "qty": k + 300, "price": k * 1.25}
                                     for k in range(20)]),
    "big-list-800": (500, lambda i: [{"i": i * 1000 + k, "s": f"x{k}"} for k in range(800)]),
    "text-4k": (10_000, lambda i: f"{i:08d}" + "t" * 4000),
    "not-found": (100_000, lambda i: None),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(shape: str, max_bytes: int = 1 << 40, scale: int = 1) -> dict[str, Any]:
    from cdcd.client.l1 import L1
    from cdcd.client.options import EntryOptions
    from cdcd.client.protocol import NOT_FOUND, make_entry
    from cdcd.client.stats import Stats

    n, build = SHAPES[shape]
    n *= scale
    opts = EntryOptions(ttl=3600)
    rng = random.Random(1)
    l1 = L1(10 * n, max_bytes, Stats())
    table_tag = "#table:public.t"
    gc.collect()
    before = _rss()
    t0 = time.perf_counter()
    for i in range(n):
        raw = build(i)
        if raw is None:
            value, negative, size = NOT_FOUND, True, 0
        else:
            data = json.dumps(raw, separators=(",", ":")).encode()
            value, negative, size = json.loads(data), False, len(data)
        gen = f"{rng.getrandbits(64):016x}"
        e = make_entry(time.monotonic(), value, negative, opts, 3600.0, [f"tenant:{i}", table_tag], size, 0.0, gen,
                       rng)
        l1.put(f"{shape}:{i}", e)
    seconds = time.perf_counter() - t0
    gc.collect()
    grown = _rss() - before
    return {"shape": shape, "entries": len(l1), "rss_growth": grown, "counted": l1.bytes, "max_bytes": max_bytes,
            "ratio": round(l1.bytes / grown, 3), "put_us": round(seconds / n * 1e6, 2)}


def run_child(shape: str, max_bytes: int | None = None, scale: int = 1) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (RSS growth of this process would include earlier runs)."""
    extra = ["--max-bytes", str(max_bytes)] if max_bytes else []
    out = subprocess.run([sys.executable, __file__, "--shape", shape, "--scale", str(scale), *extra],
                         capture_output=True, text=True, check=True, timeout=300)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--max-bytes", type=int, default=1 << 40, help="with --shape: the L1's byte bound")
    ap.add_argument("--scale", type=int, default=1, help="with --shape: entries x this")
    args = ap.parse_args()
    if args.shape:
        print(json.dumps(measure(args.shape, args.max_bytes, args.scale)))
        return
    print(f"python {sys.version.split()[0]}, load average at start {os.getloadavg()[0]:.2f}")
    print(f"{'shape':14} {'entries':>8} {'RSS growth MiB':>15} {'counted MiB':>12} {'B/entry real':>13} "
          f"{'ratio':>6} {'build+put us':>13}")
    for shape in SHAPES:
        r = run_child(shape)
        print(f"{shape:14} {r['entries']:>8,} {r['rss_growth'] / 2**20:>15.1f} {r['counted'] / 2**20:>12.1f} "
              f"{r['rss_growth'] / r['entries']:>13,.0f} {r['ratio']:>6.2f} {r['put_us']:>13.1f}")
    bound = 32 << 20
    print(f"\nl1_max_bytes = {bound >> 20} MiB, 5x the entries that fit (evictions on):")
    for shape in ("row", "orders-20"):
        r = run_child(shape, bound, scale=5)
        print(f"{shape:14} {r['entries']:>8,} entries kept, RSS growth {r['rss_growth'] / 2**20:.1f} MiB "
              f"= {r['rss_growth'] / bound:.2f}x the bound")


if __name__ == "__main__":
    main()
