"""Redis-side cost of the ``apply`` script per entry, by case, old and new side by side in one run.

Usage::

    .venv/bin/python bench/apply_script_micro.py [--entries 50000] [--rounds 3] [--groups 4,16,64]
                                                 [--base-rev ce18595] [--base-script path/to/keyspace.py]

Variants, interleaved round by round on one private redis-server (medians over ``--rounds``):

* ``cas``: a minimal versioned compare-and-set (GET, compare, SET PX): the floor a versioned write can cost;
* ``base apply``: the ``apply`` script of ``--base-rev`` (git) or ``--base-script`` (a keyspace.py), one
  entry per EVALSHA (the script before issue 9: HMGET, TIME, DEL, HSET, PEXPIRE per write);
* ``apply``: this tree's one-entry script;
* ``apply_many xG``: this tree's many-entry script, G entries of one hash slot per EVALSHA.

Cases, in this order on the same keys: new values on fresh keys, newer values over them, newer
tombstones, older (refused) values, older (refused, fencing) tombstones, tombstones on fresh keys.
``Redis CPU us/entry`` is the CPU time of Redis's main thread (``/proc/<pid>/schedstat``: reading the
commands, running the scripts, writing the replies) divided by the entries: unlike wall-clock figures it
does not grow when a busy machine takes the CPU away from Redis. ``EVALSHA us/entry`` is INFO
commandstats' (wall clock inside Redis, script only). ``entries/s`` is pre-packed RESP through one
connection, pipelined 1 000 entries per write, replies read by redis-py's parser (client parsing
included, packing not).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from _common import ROOT, machine, table

from cdcd.devservers import RedisServer
from cdcd.keyspace import APPLY, APPLY_MANY

CAS = r"""
local cur = redis.call('GET', KEYS[1])
if cur and (#cur > #ARGV[1] or (#cur == #ARGV[1] and cur >= ARGV[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

SNAP = b'{"#table:public.users":"1733380000000000"}'
ROW = b'{"id":1,"email":"u1@example.com","name":"name 1","tenant_id":7,"updated_at":"2026-12-05T08:00:00+00:00"}'
# name, kind, version, fresh keys
CASES = [("value, new key", b"v", 100, False), ("value, newer", b"v", 200, False),
         ("tombstone, newer", b"t", 300, False), ("value, older (refused)", b"v", 100, False),
         ("tombstone, older (refused)", b"t", 150, False), ("tombstone, new key", b"t", 100, True)]


def load_base(rev: str, path: str | None) -> str:
    if path is None:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:cdcd/keyspace.py"], check=True,
                              capture_output=True, text=True).stdout
        fd, tmp = tempfile.mkstemp(suffix=".py")
        os.write(fd, text.encode())
        os.close(fd)
        path = tmp
    spec = importlib.util.spec_from_file_location("base_keyspace", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return str(mod.APPLY)


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


def pack(sha: str, group: int, keys: list[bytes], kind: bytes, version: int, data: bytes) -> list[bytes]:
    """The case as RESP chunks of ~1 000 entries: one EVALSHA per entry, or per ``group`` entries."""
    ver = b"%d" % version
    per = [bulk(ver), bulk(kind), bulk(b"60000"), bulk(data if kind == b"v" else b""),
           bulk(SNAP if kind == b"v" else b"")]
    args = b"".join(per)
    size = max(group, 1)
    cmds: list[bytes] = []
    for start in range(0, len(keys), size):
        ks = keys[start:start + size]
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (3 + len(ks) * 6, sha.encode(), bulk(b"%d" % len(ks)))
        cmds.append(head + b"".join(bulk(k) for k in ks) + args * len(ks))
    chunks, cur, n = [], [], 0
    for c in cmds:
        cur.append(c)
        n += size
        if n >= 1000:
            chunks.append(b"".join(cur))
            cur, n = [], 0
    if cur:
        chunks.append(b"".join(cur))
    return chunks


def cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def run_case(r: redis.Redis, conn: Any, chunks: list[bytes], calls: int, pid: int) -> tuple[float, float, float]:
    """(Redis main-thread CPU us, EVALSHA usec in commandstats, wall seconds)."""
    r.config_resetstat()
    read = conn._parser.read_response
    cpu0 = cpu_ns(pid)
    t0 = time.perf_counter()
    pending = 0
    for chunk in chunks:
        conn.send_packed_command([chunk], check_health=False)
        pending += chunk.count(b"EVALSHA")
        if pending > 4000:  # keep the socket buffers bounded
            for _ in range(pending):
                read()
            pending = 0
    out = [read() for _ in range(pending)]
    wall = time.perf_counter() - t0
    cpu = (cpu_ns(pid) - cpu0) / 1000
    assert not any(isinstance(x, Exception) for x in out), out[:3]
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    assert stats.get("calls") == calls, (stats, calls)
    return cpu, float(stats.get("usec", 0)), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--groups", default="4,16,64", help="apply_many group sizes")
    ap.add_argument("--value-bytes", type=int, default=len(ROW),
                    help="size of the values written (a users row as JSON by default; over 64 bytes Redis "
                         "keeps the hash as a hashtable, not a listpack)")
    ap.add_argument("--base-rev", default="ce18595", help="git revision whose APPLY is the baseline")
    ap.add_argument("--base-script", default=None, help="a keyspace.py to take the baseline APPLY from instead")
    args = ap.parse_args()
    base = load_base(args.base_rev, args.base_script)
    server = RedisServer()
    server.start()
    print(machine())
    try:
        r = redis.Redis.from_url(server.url)
        variants = [("cas", r.script_load(CAS), 0), ("base apply", r.script_load(base), 0),
                    ("apply", r.script_load(APPLY), 0)]
        variants += [(f"apply_many x{g}", r.script_load(APPLY_MANY), g) for g in map(int, args.groups.split(","))]
        conn = r.connection_pool.make_connection()
        conn.connect()
        n = args.entries
        data = (ROW * (args.value_bytes // len(ROW) + 1))[:args.value_bytes]
        # every G consecutive keys share a hash tag (one slot), as the sink groups them
        keys = [b"{s%d}:k:%d" % (i // 64, i) for i in range(n)]
        fresh = [b"{s%d}:f:%d" % (i // 64, i) for i in range(n)]
        assert server.proc is not None
        pid = server.proc.pid
        cpu: dict[tuple[str, str], list[float]] = {}
        usec: dict[tuple[str, str], list[float]] = {}
        rate: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, sha, group in variants:
                r.flushall()
                for case, kind, version, new in CASES:
                    chunks = pack(sha, group, fresh if new else keys, kind, version, data)
                    calls = -(-n // group) if group else n
                    c_us, us, wall = run_case(r, conn, chunks, calls, pid)
                    cpu.setdefault((name, case), []).append(c_us / n)
                    usec.setdefault((name, case), []).append(us / n)
                    rate.setdefault((name, case), []).append(n / wall)
        rows = []
        for case, *_ in CASES:
            base_cpu = statistics.median(cpu[("base apply", case)])
            for name, _, _ in variants:
                c = statistics.median(cpu[(name, case)])
                u = statistics.median(usec[(name, case)])
                r_s = statistics.median(rate[(name, case)])
                rows.append([case, name, f"{c:.2f}", f"{c / base_cpu:.2f}", f"{u:.2f}", f"{r_s:,.0f}"])
        print(f"{n} entries per case, values of {len(data)} bytes, {args.rounds} rounds interleaved, medians; "
              f"load average at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        print(table(["case", "variant", "Redis CPU us/entry", "vs base", "EVALSHA us/entry", "entries/s"], rows))
    finally:
        server.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
