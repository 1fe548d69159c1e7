"""The fleet's hot set in Redis: what clients publish, and how ``cdcd status`` and ``cdcd warm --hot`` read it.

Layout, under the keyspace's system namespace (no row value or application key can name it):

* ``<prefix>#cdcd:hot:<run>``: one sorted set per client process (``run`` is its backplane run id),
  member = the cache key as the application names it (no prefix), score = estimated reads per second
  over the process's last window. Replaced whole at every publish (MULTI/EXEC on that one key, so a
  reader never sees half of it) and given a TTL of a few windows: a process that dies stops counting.
* ``<prefix>#cdcd:hot``: the index, member = run id, score = unix time of its last publish. Readers only
  look at runs published within ``max_age``; writers prune members older than an hour (a fixed horizon,
  so processes with different windows do not prune each other).

Why per-process sets and not one shared set with ``ZINCRBY``: a shared set needs someone to decay or
reset it, and a dead process's reads would count forever; here each process owns its key, expiry
removes the dead, and merging (adding scores, which is how Misra-Gries summaries merge) happens in
the reader. Each command touches one key, so the layout works on Redis Cluster as is.

Pure functions and one reader over any redis-py-like client: imported by the client library (no
pydantic, no psycopg).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cdcd.keyspace import Keyspace

Command = tuple[Any, ...]
INDEX_HORIZON = 3600.0  # seconds an index member may stay without publishing; its own set expires much sooner


def index_key(ks: Keyspace) -> str:
    return ks.system("hot")


def process_key(ks: Keyspace, run: str) -> str:
    return ks.system(f"hot:{run}")


def publish_commands(ks: Keyspace, run: str, top: Sequence[tuple[str, float]], now: float,
                     ttl_s: float) -> list[Command]:
    """The batch a process sends to replace its published top-K (one round trip, pipelined)."""
    key = process_key(ks, run)
    ttl_ms = max(int(ttl_s * 1000), 1)
    cmds: list[Command] = [("MULTI",), ("DEL", key)]
    if top:
        args: list[Any] = []
        for k, score in top:
            args.append(repr(float(score)))
            args.append(k)
        cmds.append(("ZADD", key, *args))
        cmds.append(("PEXPIRE", key, ttl_ms))
    cmds.append(("EXEC",))
    idx = index_key(ks)
    horizon = max(ttl_s, INDEX_HORIZON)  # not the writer's own TTL: processes may use other windows
    cmds.append(("ZADD", idx, repr(now), run))
    cmds.append(("ZREMRANGEBYSCORE", idx, "-inf", f"({now - horizon!r}"))
    cmds.append(("PEXPIRE", idx, int(horizon * 1000)))
    return cmds


@dataclass
class FleetHotSet:
    """The merged hot set: keys by summed score (estimated reads/s across the fleet), heaviest first."""

    processes: list[str] = field(default_factory=list)
    keys: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"processes": len(self.processes), "keys": [{"key": k, "score": s} for k, s in self.keys]}


def read_fleet(client: Any, ks: Keyspace, max_age: float = 60.0, top: int | None = None,
               min_score: float = 0.0, now: float | None = None) -> FleetHotSet:
    """Merge the sets of every process that published within ``max_age`` seconds.

    ``top`` keeps the ``top`` heaviest keys after merging, ``min_score`` drops keys below that score.
    """
    now = time.time() if now is None else now
    idx = index_key(ks)
    raw = client.zrangebyscore(idx, now - max_age, "+inf")
    runs = [r.decode() if isinstance(r, bytes) else str(r) for r in raw]
    pipe = client.pipeline(transaction=False)
    for run in runs:
        pipe.zrange(process_key(ks, run), 0, -1, withscores=True)
    merged: dict[str, float] = {}
    alive: list[str] = []
    for run, members in zip(runs, pipe.execute() if runs else [], strict=True):
        if members:
            alive.append(run)
        for member, score in members:
            k = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
            merged[k] = merged.get(k, 0.0) + float(score)
    ranked = sorted(((k, s) for k, s in merged.items() if s >= min_score), key=lambda kv: (-kv[1], kv[0]))
    return FleetHotSet(alive, ranked if top is None else ranked[:top])
