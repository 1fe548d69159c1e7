"""CPU per Debezium record spent in ``parse_record``, this tree vs a baseline tree, and ``json.loads`` for scale.

Usage::

    .venv/bin/python bench/debezium_parse_micro.py [--baseline DIR] [--records 2000] [--rounds 5] [--no-schemas]

The records are ``apply_throughput_kafka.py``'s mix (real connector schemas, ~3.5 KB each with
schemas). Process CPU time (``time.process_time``), best of ``--rounds``, alternating the trees, so
a busy machine inflates the figures less than wall time would. ``--baseline`` is a checkout of the
code before (e.g. ``git archive main | tar -x -C DIR``); its ``cdcd/sources/debezium.py`` is loaded
under another module name next to this tree's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table
from apply_throughput_kafka import Events

from cdcd.sources import debezium


def load_baseline(tree: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("debezium_baseline", tree / "cdcd" / "sources" / "debezium.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["debezium_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_per_record(fn: Callable[[bytes, bytes, int], Any], events: list[tuple[str, bytes, bytes]]) -> float:
    t0 = time.process_time()
    for i, (_, key, value) in enumerate(events):
        fn(value, key, i)
    return (time.process_time() - t0) / len(events) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-schemas", dest="schemas", action="store_false")
    args = ap.parse_args()
    make = Events(args.schemas)
    events = [make(i) for i in range(args.records)]
    variants: dict[str, Callable[[bytes, bytes, int], Any]] = {
        "json.loads (the value, nothing else)": lambda v, k, i: json.loads(v),
    }
    if args.baseline:
        base = load_baseline(args.baseline)
        variants["parse_record, baseline"] = lambda v, k, i: base.parse_record(v, k, ("t", 0, i))
    variants["parse_record, this tree"] = lambda v, k, i: debezium.parse_record(v, k, ("t", 0, i))
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], cpu_per_record(fn, events))
    print(f"machine: {machine()}")
    print(f"{args.records} records, {sum(len(v) for _, _, v in events) // len(events)} bytes each on average "
          f"({'with' if args.schemas else 'without'} schemas), best of {args.rounds} rounds")
    print(table(["what", "CPU µs per record"], [[n, f"{us:.1f}"] for n, us in best.items()]))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
