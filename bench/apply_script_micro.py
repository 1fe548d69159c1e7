"""Redis-side cost of the ``apply`` script per call, by case (INFO commandstats ``usec_per_call``).

Usage::

    .venv/bin/python bench/apply_script_micro.py [--calls 200000] [--script path/to/keyspace.py]

``--script`` loads APPLY from another copy of ``cdcd/keyspace.py`` (e.g. main's) to compare. Cases: new
values on fresh keys, newer tombstones over them, older (refused) values and older tombstones (refused; since
docs/versions.md they also fence). Pipelined EVALSHA in batches of 1 000 on a private redis-server.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import redis
from _common import machine, table

from cdcd.devservers import RedisServer
from cdcd.keyspace import APPLY


def load_apply(path: str | None) -> str:
    if path is None:
        return APPLY
    spec = importlib.util.spec_from_file_location("other_keyspace", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return str(mod.APPLY)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--script", default=None, help="another keyspace.py to take APPLY from")
    args = ap.parse_args()
    source = load_apply(args.script)
    server = RedisServer()
    server.start()
    try:
        r = redis.Redis.from_url(server.url)
        sha = r.script_load(source)
        n = args.calls
        rows = []
        cases = [("value, new key", "v", 100), ("tombstone, newer", "t", 200),
                 ("value, older (refused)", "v", 100), ("tombstone, older (refused)", "t", 50)]
        for name, kind, version in cases:
            r.config_resetstat()
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                pipe = r.pipeline(transaction=False)
                for i in range(start, min(n, start + 1000)):
                    pipe.execute_command("EVALSHA", sha, 1, f"k:{i}", version, kind, 60000,
                                         b"x" * 64 if kind == "v" else b"", "")
                pipe.execute()
            wall = time.perf_counter() - t0
            stats = r.info("commandstats").get("cmdstat_evalsha", {})
            rows.append([name, n, f"{stats.get('usec_per_call', 0):.2f}", f"{n / wall:,.0f}"])
        print(machine())
        print(table(["case", "calls", "Redis usec/call", "calls/s (client incl.)"], rows))
    finally:
        server.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
