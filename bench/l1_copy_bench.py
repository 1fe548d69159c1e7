"""What ``CacheOptions(l1_copy=True)`` costs an L1 hit: a decode per hit, against the shared object (the default).

    PYTHONPATH=. .venv/bin/python bench/l1_copy_bench.py [--rounds 5] [--n 200000]

One sync ``Cache`` per mode over a throwaway Redis, the value loaded once, then ``get_or_load`` hits; the
rounds alternate between the modes and the median is reported. Values as in bench/serializer_bench.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serializer_bench import ROW, TYPED
from cdcd.client import Cache, CacheOptions, EntryOptions
from cdcd.devservers import redis_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    with redis_server() as rs:
        caches = {copy: Cache(rs.url, CacheOptions(prefix="lc:", subscribe=False, require_registry=False, l1_copy=copy,
                                                   entry=EntryOptions(ttl=3600, jitter=0.0)))
                  for copy in (False, True)}
        rates: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.rounds):
            for name, value in (("row", ROW), ("typed", TYPED)):
                for copy, cache in caches.items():
                    get = cache.get_or_load
                    get(name, lambda v=value: v)  # type: ignore[misc]
                    t0 = time.perf_counter()
                    for _ in range(args.n):
                        get(name, list)
                    rates.setdefault((name, copy), []).append((time.perf_counter() - t0) / args.n * 1e6)
        for c in caches.values():
            c.close()
    print(f"rounds={args.rounds}, n={args.n}, load average {os.getloadavg()[0]:.2f}; median µs per L1 hit")
    print(f"{'value':6} {'shared (default)':>17} {'l1_copy=True':>13}")
    for name in ("row", "typed"):
        shared, copied = statistics.median(rates[(name, False)]), statistics.median(rates[(name, True)])
        print(f"{name:6} {shared:17.2f} {copied:13.2f}")


if __name__ == "__main__":
    main()
