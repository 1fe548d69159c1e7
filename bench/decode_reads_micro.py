"""What decoding only the columns the rules read saves, by table width (synthetic pgoutput, no servers).

Usage::

    .venv/bin/python bench/decode_reads_micro.py [--changes 50000] [--rounds 5]

Builds pgoutput frames for a table of ``W`` columns (id bigint, tenant int, then text, numeric,
timestamptz and jsonb columns in turn; every value sent as text, as pgoutput protocol 1 does) with an
``invalidate`` rule reading two of them (``t:{id}``, tag ``tenant:{tenant}``), half inserts, half updates
with a full old row (``REPLICA IDENTITY FULL``). Each round times the full decoder (every column decoded
and converted) and the pruned one (``decoder.reads = rules.reads``, as the daemon's source sets it)
alternately on the same frames; the table shows the median of ``--rounds`` of this process's CPU time
per change, and the planned batches are checked equal.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table

from cdcd.change import Transaction
from cdcd.pg.pgoutput import PgOutputDecoder
from cdcd.rules import Defaults, KeyspaceSettings, Rules, TableRule

TYPES = [(25, "some text value {i}"), (1700, "{i}.25"), (1184, "2024-01-02 03:04:05.{i:06d}+00"),
         (3802, '{{"k": {i}, "v": [1, 2]}}')]


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def frames(width: int, n: int) -> list[bytes]:
    cols = [("id", 20, True), ("tenant", 23, False)]
    cols += [(f"c{j}", TYPES[j % len(TYPES)][0], False) for j in range(width - 2)]
    rel = b"R" + struct.pack("!I", 1) + _s("public") + _s("wide") + b"f" + struct.pack("!h", len(cols))
    for name, typ, key in cols:
        rel += struct.pack("!b", 1 if key else 0) + _s(name) + struct.pack("!Ii", typ, -1)

    def tup(i: int) -> bytes:
        vals = [str(i), str(i % 100)] + [TYPES[j % len(TYPES)][1].format(i=i % 1000) for j in range(width - 2)]
        return struct.pack("!h", len(vals)) + b"".join(
            b"t" + struct.pack("!i", len(v.encode())) + v.encode() for v in vals)

    out = [rel]
    for i in range(n):
        if i % 10 == 0:
            out.append(b"B" + struct.pack("!QqI", 100 + i, 0, i))
        head = struct.pack("!I", 1)
        out.append(b"I" + head + b"N" + tup(i) if i % 2 == 0 else b"U" + head + b"O" + tup(i) + b"N" + tup(i + 1))
        if i % 10 == 9:
            out.append(b"C" + struct.pack("!bQQq", 0, 100 + i, 101 + i, 0))
    return out


def decode(msgs: list[bytes], rules: Rules | None) -> list[Transaction]:
    dec = PgOutputDecoder("bench")
    if rules is not None:
        dec.reads = rules.reads
    return [t for t in map(dec.feed, msgs) if isinstance(t, Transaction)]


def run(msgs: list[bytes], rules: Rules | None) -> float:
    dec = PgOutputDecoder("bench")
    if rules is not None:
        dec.reads = rules.reads
    feed = dec.feed
    c0 = time.process_time()
    for m in msgs:
        feed(m)
    return time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rules = Rules({"wide": TableRule(keys=["t:{id}"], tags=["tenant:{tenant}"])}, KeyspaceSettings(), Defaults())
    rows = []
    for width in (5, 10, 20, 40):
        msgs = frames(width, args.changes)
        full_plan, pruned_plan = rules.plan(decode(msgs, None)), rules.plan(decode(msgs, rules))
        assert full_plan.writes.keys() == pruned_plan.writes.keys() and full_plan.tags == pruned_plan.tags
        gc.collect()
        gc.freeze()
        full, pruned = [], []
        for _ in range(args.rounds):
            full.append(run(msgs, None))
            pruned.append(run(msgs, rules))
        f, p = statistics.median(full) / args.changes * 1e6, statistics.median(pruned) / args.changes * 1e6
        rows.append([width, f"{f:.2f}", f"{p:.2f}", f"{(1 - p / f) * 100:.0f}%"])
        gc.unfreeze()
    print(f"machine: {machine()}")
    print(f"{args.changes} changes per width (half inserts, half full-row updates), rule reads 2 columns; "
          f"median of {args.rounds} alternating rounds, CPU us per change")
    print(table(["columns", "decode all", "decode what the rules read", "saved"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
