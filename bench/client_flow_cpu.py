"""The client's own CPU per L2 hit, without the socket: A/B two source trees.

    .venv/bin/python bench/client_flow_cpu.py BEFORE_TREE AFTER_TREE [--runs 3] [--n 5000]

Each run is a fresh interpreter with ``PYTHONPATH=<tree>``: a ``Cache`` with L1 off reads one key from a
throwaway Redis once, records the replies, then replaces ``link.call`` with a function that returns
them, so every further ``get`` / ``get_or_load`` runs the whole client path (flow, single flight,
parsing, decoding) but no I/O. The caller's CPU time (``time.thread_time``, best of 15 slices) per call
is what the client's Python costs; a busy machine's scheduling and Redis's latency do not enter it.
``bench/client_ab.py`` measures the same paths with the socket.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdcd.devservers import redis_server

CHILD = r"""
import json, sys, time
from cdcd.client import Cache, CacheOptions, EntryOptions
url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
VALUE = {"id": 42, "email": "ada@example.com", "name": "Ada Lovelace", "tenant_id": 7, "active": True}
c = Cache(url, CacheOptions(prefix=prefix, l1_max_entries=0, subscribe=False, require_registry=False,
                            entry=EntryOptions(ttl=3600, jitter=0.0)))
loader = lambda: VALUE
c.get_or_load("user:42", loader)
real, replies = c.link.call, {}
def record(cmds):
    replies[cmds[0][0]] = out = real(cmds)
    return out
c.link.call = record
c.get("user:42")
c.get_or_load("user:42", loader)
c.link.call = lambda cmds: replies[cmds[0][0]]
out = {}
for name, fn, args in (("L2 get", c.get, ("user:42",)), ("L2 get_or_load", c.get_or_load, ("user:42", loader))):
    best = 1e9
    for _ in range(15):
        t0 = time.thread_time()
        for _ in range(n):
            fn(*args)
        best = min(best, (time.thread_time() - t0) / n * 1e6)
    out[name] = best
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    got: dict[str, dict[str, list[float]]] = {side: {} for side in trees}
    with redis_server() as rs:
        for i in range(args.runs):
            for side, tree in (list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]):
                res = subprocess.run([sys.executable, "-c", CHILD, rs.url, f"cpu{side}:", str(args.n)],
                                     capture_output=True, text=True, env={"PYTHONPATH": tree}, cwd=tree, check=True,
                                     timeout=600)
                for k, v in json.loads(res.stdout).items():
                    got[side].setdefault(k, []).append(v)
    print(f"runs={args.runs} per side, alternating; n={args.n}; client CPU µs per call (median of runs)")
    print(f"{'path':16} {'before µs':>10} {'after µs':>10} {'change':>8}")
    for k in got["before"]:
        b, a = statistics.median(got["before"][k]), statistics.median(got["after"][k])
        print(f"{k:16} {b:10.2f} {a:10.2f} {100 * (a - b) / b:+7.1f}%")


if __name__ == "__main__":
    main()
