"""The in-process tier: an LRU bounded by entries and by estimated memory bytes (cdcd.client.sizing), with a tag index.

The hit path is a dict lookup, a clock read, a comparison and one attribute store
(the entry's "recently used" bit); it takes no lock (CPython's dict and
OrderedDict operations are atomic under the GIL). Writes and evictions take a
lock so the byte count and the tag index stay consistent. Eviction is CLOCK
("second chance"): the oldest entry is evicted unless it was read since it was
last looked at, in which case it moves to the young end. That approximates LRU
without reordering on every hit, which would cost the hit path a lock or a
``move_to_end``.

Two kinds of invalidation, on purpose:

* **remove** (a backplane message names the key or one of its tags, or this
  process wrote it): the value is known to be superseded and is dropped; it is
  never served again, not even as a fail-safe fallback.
* **expire** (the backplane may have lost messages: a gap, a reconnect, a new
  daemon run): nothing is known to be wrong, so entries are only marked expired.
  They are not served normally, but remain the fail-safe fallback if the reload
  then fails.

**The insert race.** A reader that fetched a value from L2 (or filled L2) and
then inserts it into L1 may be overtaken by an invalidation: Redis changes, the
backplane message arrives and drops the key, and *then* the reader inserts the
value it read before the change, which would stay until its L1 TTL. Every
invalidation therefore advances an epoch and records, per key and per tag, the
epoch it happened at; a reader takes :meth:`L1.begin` before it reads L2 and
:meth:`L1.put` refuses its insert if the key, one of the entry's tags, or the
whole L1 was invalidated since. The per-key/per-tag logs are bounded: when they
grow past :data:`DROP_LOG_MAX` they are cleared and every insert begun before
that moment is refused (the safe direction).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .sizing import TAG_SET, entry_bytes, slot_bytes
from .stats import Stats

DROP_LOG_MAX = 100_000


class L1Entry:
    """One cached value. Times are ``time.monotonic()`` seconds."""

    __slots__ = ("delta", "early", "generation", "hard", "keep", "negative", "ref", "size", "soft", "tags", "value")

    def __init__(self, value: Any, soft: float, hard: float, keep: float, tags: tuple[str, ...], size: int,
                 negative: bool, delta: float, generation: str | None = None) -> None:
        self.value = value
        self.soft = soft  # fresh until; stale-while-revalidate after
        self.hard = hard  # served (possibly stale) until; reloaded after
        self.keep = keep  # kept as the fail-safe fallback until
        self.tags = tags  # every tag it depends on, table tags included (the backplane drops by these)
        self.size = size  # bytes it holds in memory (see :func:`sized`), its key and L1 slot excluded
        self.negative = negative  # a cached "not found"
        self.delta = delta  # seconds the load took (XFetch); 0 when this process did not load it
        self.generation = generation  # the L2 generation it mirrors (None: not in L2)
        # The hit path serves without further checks before ``early``: the XFetch window opens there (the
        # cache sets it from delta and beta), else it equals ``soft``.
        self.early = soft
        self.ref = False  # CLOCK bit: read since eviction last looked at it


ENTRY_OBJECT = sys.getsizeof(L1Entry(None, 0.0, 0.0, 0.0, (), 0, False, 0.0))


def sized(value: Any, tags: tuple[str, ...], generation: str | None, serialized: int) -> int:
    """:attr:`L1Entry.size` of an entry holding ``value`` (pass None for a shared sentinel such as NOT_FOUND)."""
    return entry_bytes(ENTRY_OBJECT, value, tags, generation, serialized)


class L1:
    def __init__(self, max_entries: int, max_bytes: int, stats: Stats) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.stats = stats
        self.data: OrderedDict[str, L1Entry] = OrderedDict()
        self.by_tag: dict[str, set[str]] = {}
        self.bytes = 0
        self.epoch = 0
        self._horizon = 0  # inserts begun before this epoch are refused (reset, or the drop log was trimmed)
        self._key_drops: dict[str, int] = {}
        self._tag_drops: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.data)

    def begin(self) -> int:
        """Call before reading L2; pass the result to :meth:`put` (see the module docstring)."""
        return self.epoch

    # ------------------------------------------------------------------ writes

    def put(self, key: str, entry: L1Entry, since: int | None = None, fence: bool = False) -> bool:
        """Insert unless an invalidation touched the key, its tags or all of L1 after ``since``.

        ``fence``: this process itself just wrote the key to L2 (``set``); reads of the key begun
        before now are refused too, so none of them can put back the value it read before the write.
        """
        if self.max_entries <= 0:
            return False
        with self._lock:
            if since is not None and not self._still_valid(key, entry.tags, since):
                self.stats.l1_put_refused += 1
                return False
            if fence:
                self._key_drops[key] = self._advance()
            old = self.data.pop(key, None)
            if old is not None:
                self._unindex(key, old)
            self.data[key] = entry
            self.bytes += entry.size + slot_bytes(key, len(entry.tags))
            by_tag = self.by_tag
            for t in entry.tags:
                keys = by_tag.get(t)
                if keys is None:
                    by_tag[t] = keys = set()
                    self.bytes += TAG_SET
                keys.add(key)
            self._evict()
        return True

    def _still_valid(self, key: str, tags: Iterable[str], since: int) -> bool:
        if since < self._horizon or self._key_drops.get(key, -1) > since:
            return False
        drops = self._tag_drops
        return not any(drops.get(t, -1) > since for t in tags) if drops else True

    def _evict(self) -> None:
        data = self.data
        spins = 0
        while len(data) > self.max_entries or (self.bytes > self.max_bytes and len(data) > 1):
            k, e = data.popitem(last=False)
            if e.ref and spins <= len(data):
                e.ref = False  # second chance: read since we last looked
                data[k] = e
                spins += 1
                continue
            self._unindex(k, e)
            self.stats.l1_evictions += 1

    def replace(self, key: str, old: L1Entry, new: L1Entry) -> bool:
        """Swap ``old`` for ``new`` only if ``old`` is still the entry (not invalidated meanwhile)."""
        with self._lock:
            if self.data.get(key) is not old:
                return False
            self.data[key] = new
            self.bytes += new.size - old.size
            return True

    def _unindex(self, key: str, e: L1Entry) -> None:
        self.bytes -= e.size + slot_bytes(key, len(e.tags))
        for t in e.tags:
            keys = self.by_tag.get(t)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_tag[t]
                    self.bytes -= TAG_SET

    def _advance(self) -> int:
        self.epoch += 1
        if len(self._key_drops) + len(self._tag_drops) > DROP_LOG_MAX:
            self._key_drops.clear()
            self._tag_drops.clear()
            self._horizon = self.epoch
        return self.epoch

    # ------------------------------------------------------------------ invalidation

    def remove(self, key: str) -> None:
        """The key's value is superseded: drop it, and refuse inserts of reads begun before now."""
        self.remove_many((key,))

    def remove_many(self, keys: Iterable[str]) -> None:
        with self._lock:
            epoch = self._advance()
            for key in keys:
                self._key_drops[key] = epoch
                e = self.data.pop(key, None)
                if e is not None:
                    self._unindex(key, e)

    def remove_tags(self, tags: Iterable[str]) -> int:
        """Drop every entry that depends on one of these tags (their counters moved). Returns how many."""
        n = 0
        with self._lock:
            epoch = self._advance()
            for tag in tags:
                self._tag_drops[tag] = epoch
                for key in list(self.by_tag.get(tag, ())):
                    e = self.data.pop(key, None)
                    if e is not None:
                        self._unindex(key, e)
                        n += 1
        return n

    def expire(self, key: str) -> None:
        """Mark one entry expired but keep it as the fail-safe fallback."""
        with self._lock:
            epoch = self._advance()
            self._key_drops[key] = epoch
            e = self.data.get(key)
            if e is not None:
                e.early = e.soft = e.hard = 0.0

    def expire_all(self) -> None:
        """Nothing in L1 can be trusted to be current (a backplane gap): expire everything, keep fallbacks."""
        with self._lock:
            self._horizon = self._advance()
            for e in self.data.values():
                e.early = e.soft = e.hard = 0.0

    def clear(self) -> None:
        with self._lock:
            self._horizon = self._advance()
            self.data.clear()
            self.by_tag.clear()
            self.bytes = 0

    def purge_dead(self, now: float | None = None) -> int:
        """Drop entries past their fail-safe window (called periodically by the backplane listener)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [k for k, e in self.data.items() if e.keep <= now]
            for k in dead:
                self._unindex(k, self.data.pop(k))
        return len(dead)
