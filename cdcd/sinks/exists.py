"""The daemon's writes to existence filters (docs/existence-filter.md), for :class:`cdcd.sinks.redis.RedisSink`.

Two kinds: the commands a batch carries (new keys' bits, or unseeding a filter that lost track of
inserts), which the sink puts in the batch's own pipeline after the entry writes and *before* the
applied position and the backplane messages; and the builder's calls (begin a generation, fill it
from a snapshot, switch to it), which run on the sink's client from the builder thread. Every call
touches one filter's three keys, which share a hash tag: single-slot on Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cdcd.bloom import hash_pair
from cdcd.keyspace import SCRIPTS, Keyspace
from cdcd.rules import Batch, ExistsSpec

_ADD = SCRIPTS["exists_add"]
_DROP = SCRIPTS["exists_drop"]
_BEGIN = SCRIPTS["exists_begin"]
_FILL = SCRIPTS["exists_fill"]
_SWITCH = SCRIPTS["exists_switch"]
CHUNK = 2048  # arguments (two per key) per script call: a few ms of Redis time at most


@dataclass(frozen=True, slots=True)
class FilterState:
    """What a filter's meta hash says (see :data:`cdcd.keyspace.EXISTS_ADD` for the fields)."""

    active: str | None  # the active slot, None: not seeded (checks answer "maybe")
    params: str | None  # the active generation's bloom.params_id
    building: str | None  # the build id of a build under way (perhaps by a daemon that died)
    bits: int  # bits set when the active generation was built
    generation: int
    version: int
    present: tuple[bool, bool] = (False, False)  # whether each slot's bitmap exists

    @property
    def lost(self) -> bool:
        """The meta names an active bitmap that is gone (evicted, deleted): checks answer "maybe" until rebuilt."""
        return self.active is not None and not self.present[int(self.active)]

    @classmethod
    def parse(cls, raw: dict[bytes, bytes], present: tuple[bool, bool] = (False, False)) -> FilterState:
        def text(f: str) -> str | None:
            v = raw.get(f.encode())
            return v.decode() if v is not None else None

        def num(f: str) -> int:
            return int(text(f) or 0)

        return cls(text("a"), text("ap"), text("bid"), num("bits"), num("gen"), num("v"), present)


class ExistsWrites:
    def __init__(self, client: Any, ks: Keyspace, specs: dict[str, ExistsSpec]) -> None:
        self.client = client
        self.ks = ks
        self.specs = specs

    def batch_commands(self, batch: Batch) -> list[tuple[Any, ...]]:
        """The batch's filter commands: unseed filters that lost track first, then set new keys' bits (in a
        filter being rebuilt, unseeding cancels the build; the bits then land nowhere, harmlessly)."""
        cmds: list[tuple[Any, ...]] = []
        for rel in batch.exists_reset:
            if rel in self.specs:
                cmds.append(("EVALSHA", _DROP.sha, 3, *self.ks.exists_filter(rel)))
        version = str(batch.version)
        for rel, keys in batch.exists.items():
            spec = self.specs.get(rel)
            if spec is None:
                continue
            m, k = spec.params.m, spec.params.k
            head = ("EVALSHA", _ADD.sha, 3, *self.ks.exists_filter(rel), version, spec.params_id, m, k)
            for chunk in _chunks(_pairs(keys, m), CHUNK):
                cmds.append((*head, *chunk))
        return cmds

    # ------------------------------------------------------------------ the builder's calls

    def load_scripts(self) -> None:
        for script in (_BEGIN, _FILL, _SWITCH):
            self.client.script_load(script.source)

    def state(self, rel: str) -> FilterState:
        meta, b0, b1 = self.ks.exists_filter(rel)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(meta)
        pipe.exists(b0)
        pipe.exists(b1)
        raw, e0, e1 = pipe.execute()
        return FilterState.parse(raw, (bool(e0), bool(e1)))

    def bitcount(self, rel: str, slot: str) -> int:
        return int(self.client.bitcount(self.ks.exists_filter(rel)[1 + int(slot)]))

    def begin(self, rel: str, build_id: str) -> str:
        """Allocate the inactive generation and mark it as being built: from now on every applied insert
        also lands in it. Returns its slot."""
        spec = self.specs[rel]
        slot = self.client.execute_command("EVALSHA", _BEGIN.sha, 3, *self.ks.exists_filter(rel), build_id,
                                           spec.params.m, spec.params_id)
        return slot.decode() if isinstance(slot, bytes) else str(slot)

    def fill(self, rel: str, build_id: str, keys: Iterable[str]) -> bool:
        """Set snapshot keys' bits in the generation being built; False when the build is no longer current."""
        p = self.specs[rel].params
        pipe = self.client.pipeline(transaction=False)
        for chunk in _chunks(_pairs(keys, p.m), CHUNK):
            pipe.execute_command("EVALSHA", _FILL.sha, 3, *self.ks.exists_filter(rel), build_id, p.m, p.k, *chunk)
        return all(r == 1 for r in pipe.execute())

    def switch(self, rel: str, build_id: str, version: int) -> int | None:
        """Make the built generation active (and free the old one); its bit count, None when the build is
        no longer current."""
        bits = self.client.execute_command("EVALSHA", _SWITCH.sha, 3, *self.ks.exists_filter(rel), build_id, version,
                                      repr(time.time()))
        return None if int(bits) < 0 else int(bits)


def pack_ints(cmd: tuple[Any, ...]) -> bytes:
    """RESP of one command whose arguments are str or int: the sink's packed path sends thousands of integers
    per batch, which redis-py's packer formats at ~1.3 µs each."""
    out = [b"*%d\r\n" % len(cmd)]
    for a in cmd:
        b = a.encode() if isinstance(a, str) else b"%d" % a
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def _pairs(keys: Iterable[str], m: int) -> list[int]:
    """:func:`cdcd.bloom.hash_pair` of each key, flattened: the scripts' arguments."""
    out: list[int] = []
    add = out.extend
    for key in keys:
        add(hash_pair(key, m))
    return out


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    """Whole pairs per call: ``size`` is even."""
    return (items[i:i + size] for i in range(0, len(items), size))
