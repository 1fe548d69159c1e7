"""The in-process tier: an LRU bounded by entries and approximate bytes, with a tag index.

The hit path is a dict lookup, a clock read and a comparison; it takes no lock
(CPython's dict and OrderedDict operations are atomic under the GIL). Writes and
evictions take a lock so the byte count and the tag index stay consistent.

Invalidation *expires* an entry rather than deleting it: an expired entry is never
served normally, but it is the fail-safe fallback if the reload then fails.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from cdcd.client.stats import Stats


class L1Entry:
    __slots__ = ("delta", "early", "hard", "keep", "negative", "refreshing", "size", "soft", "tags", "value")

    def __init__(self, value: Any, soft: float, hard: float, keep: float, tags: tuple[str, ...], size: int,
                 negative: bool, delta: float) -> None:
        self.value = value
        self.soft = soft  # monotonic: fresh until
        self.hard = hard  # stale-while-revalidate until; expired after
        self.keep = keep  # fail-safe fallback until
        self.tags = tags
        self.size = size
        self.negative = negative
        self.delta = delta  # seconds the load took (XFetch)
        # XFetch fires with probability exp(-(soft - now) / (delta * beta)); before this point that is
        # below e^-20, so the hit path skips the random draw entirely (set by the cache, which knows beta)
        self.early = soft
        self.refreshing = False


class L1:
    def __init__(self, max_entries: int, max_bytes: int, stats: Stats) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.stats = stats
        self.data: OrderedDict[str, L1Entry] = OrderedDict()
        self.by_tag: dict[str, set[str]] = {}
        self.bytes = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.data)

    def put(self, key: str, entry: L1Entry) -> None:
        with self._lock:
            old = self.data.pop(key, None)
            if old is not None:
                self._unindex(key, old)
            self.data[key] = entry
            self.bytes += entry.size
            for t in entry.tags:
                self.by_tag.setdefault(t, set()).add(key)
            while len(self.data) > self.max_entries or (self.bytes > self.max_bytes and len(self.data) > 1):
                k, e = self.data.popitem(last=False)
                self._unindex(k, e)
                self.stats.l1_evictions += 1

    def _unindex(self, key: str, e: L1Entry) -> None:
        self.bytes -= e.size
        for t in e.tags:
            keys = self.by_tag.get(t)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_tag[t]

    def remove(self, key: str) -> None:
        with self._lock:
            e = self.data.pop(key, None)
            if e is not None:
                self._unindex(key, e)

    def expire(self, key: str) -> None:
        e = self.data.get(key)
        if e is not None:
            e.early = e.soft = e.hard = 0.0

    def expire_tag(self, tag: str) -> int:
        with self._lock:
            keys = list(self.by_tag.get(tag, ()))
        for k in keys:
            self.expire(k)
        return len(keys)

    def expire_all(self) -> None:
        with self._lock:
            for e in self.data.values():
                e.early = e.soft = e.hard = 0.0

    def purge_dead(self) -> None:
        """Drop entries past their fail-safe window (called now and then from writes)."""
        now = time.monotonic()
        with self._lock:
            dead = [k for k, e in self.data.items() if e.keep <= now]
            for k in dead:
                self._unindex(k, self.data.pop(k))
