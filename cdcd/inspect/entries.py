"""The inspector's Redis side: entries as the client reads them, tag counters, the daemon's applied version.

An entry is parsed by :meth:`cdcd.fillguard.FillGuard.parse`, the client's own parse, with the
writer field ``s`` added; a key that does not parse as a cdcd entry is "foreign" and skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from cdcd.fillguard import Entry, FillGuard
from cdcd.keyspace import Keyspace

FOREIGN = "foreign"
_FIELDS = ("v", "g", "d", "n", "t", "s")


def _s(b: Any) -> str | None:
    if b is None:
        return None
    return b.decode() if isinstance(b, bytes) else str(b)


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)


class EntryReader:
    def __init__(self, client: Any, keyspace: Keyspace) -> None:
        self.redis = client
        self.ks = keyspace
        self._tag_cache: dict[str, str | None] = {}

    def entries(self, keys: Sequence[str]) -> list[Entry | str | None]:
        """Entry per key; None when absent, :data:`FOREIGN` when the key is not a cdcd entry."""
        out: list[Entry | str | None] = []
        for start in range(0, len(keys), 500):
            pipe: Any = self.redis.pipeline(transaction=False)
            chunk = keys[start:start + 500]
            for k in chunk:
                pipe.hmget(k, *_FIELDS)
            for k, res in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(res, Exception):
                    out.append(FOREIGN)
                    continue
                v, g, d = res[0], res[1], res[2]
                if v is None and g is None and d is None:
                    out.append(None)
                    continue
                try:
                    e = FillGuard.parse(k, list(res))
                    int(e.version)
                    if e.generation is not None:
                        int(e.generation)
                except ValueError:  # not numbers, or tags that are not JSON: not written by cdcd
                    out.append(FOREIGN)
                    continue
                out.append(e)
        return out

    def clear_tags(self) -> None:
        """Forget the tag counters read so far (each round reads them afresh)."""
        self._tag_cache.clear()

    def tag_counters(self, entries: Iterable[Entry]) -> dict[str, str | None]:
        """Current counters of every tag the given entries recorded (one MGET for the ones not read yet)."""
        names: set[str] = set()
        for e in entries:
            if e.hit and isinstance(e.tags, dict):
                names.update(e.tags)
        names = {n for n in names if n not in self._tag_cache}
        if names:
            ordered = sorted(names)
            vals = self.redis.mget([self.ks.tag(n) for n in ordered])
            self._tag_cache.update({n: _s(v) for n, v in zip(ordered, vals, strict=True)})
        return self._tag_cache

    def applied(self) -> int | None:
        """The daemon's applied version (an LSN for the postgres source), None before its first batch."""
        v = self.redis.hget(self.ks.applied, "version")
        try:
            return int(_s(v)) if v is not None else None  # type: ignore[arg-type]
        except ValueError:
            return None

    def scan_keys(self, limit: int | None) -> Iterator[str]:
        """Entry keys under the prefix (cdcd's own keys skipped), ``limit`` at most."""
        n = 0
        for raw in self.redis.scan_iter(match=_glob_escape(self.ks.prefix) + "*", count=1000):
            k = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            if self.ks.is_system(k):
                continue
            yield k
            n += 1
            if limit is not None and n >= limit:
                return
