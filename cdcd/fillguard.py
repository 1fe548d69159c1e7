"""The fill guard: cache-aside fills that can never write back a stale row.

The race it closes: app A misses, reads the old row; B commits and the daemon
invalidates; A writes its old row back and it stays until TTL. With the guard:

1. ``read(key)`` returns what the key holds and a token (its generation). When the
   key holds nothing, a short lease entry is created so the token is never
   "nothing": a tombstone or lease that expires or is evicted makes the fill
   fail instead of letting a stale value in.
2. The app queries the database.
3. ``fill(entry, value)`` writes only if the key's generation is still the token.
   Any change the daemon applied in between (it always moves the generation)
   makes the fill return ``False``; the app still uses the value it loaded, and
   the cache keeps the newer state.

This is the primitive the client library (:mod:`cdcd.client`) builds on; apps
that want only the guard can use it directly with a redis-py client::

    guard = FillGuard(redis.Redis(), Keyspace("v3:"))
    entry = guard.read("user:42")
    if entry.hit:
        return json.loads(entry.value)
    row = db.fetch_user(42)
    guard.fill(entry, json.dumps(row).encode(), ttl=300)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdcd.keys import check_name
from cdcd.keyspace import SCRIPTS, Keyspace, run_script


def _s(value: object) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Entry:
    """What one read found. ``generation`` is the fill token."""

    key: str
    version: str
    generation: str | None
    value: bytes | None = None
    negative: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)
    writer: str | None = None  # field ``s`` (cdc, app, lease) when the read asked for it (``cdcd inspect``)

    @property
    def hit(self) -> bool:
        """A value or a cached "not found" (tag validity is checked by the caller)."""
        return self.value is not None or self.negative


class FillGuard:
    def __init__(self, client: object, keyspace: Keyspace, lease_ttl: float = 10.0) -> None:
        self.client = client
        self.keyspace = keyspace
        self.lease_ttl_ms = int(lease_ttl * 1000)

    @staticmethod
    def parse(key: str, raw: list[object]) -> Entry:
        """The fields ``v g d n t`` (the read script's reply), optionally followed by ``s``."""
        v, g, d, n, t, *more = raw
        tags: dict[str, str] = json.loads(_s(t) or "{}") if t else {}
        return Entry(
            key=key, version=_s(v) or "0", generation=_s(g),
            value=d if isinstance(d, bytes) else (d.encode() if isinstance(d, str) else None),
            negative=_s(n) == "1", tags=tags, writer=_s(more[0]) if more else None,
        )

    def read(self, key: str, lease: bool = True) -> Entry:
        check_name(key)  # names with '#' could address cdcd's own keys
        raw = run_script(self.client, SCRIPTS["read"], [self.keyspace.entry(key)],
                         [self.lease_ttl_ms, "1" if lease else "0"])
        return self.parse(key, list(raw))  # type: ignore[call-overload]

    def fill(self, entry: Entry, value: bytes | None, ttl: float, tags: Mapping[str, str] | None = None,
             negative: bool = False) -> bool:
        """Write through the guard; ``False`` means a newer change won (not an error)."""
        if entry.generation is None:
            return False
        snap = json.dumps(dict(tags), separators=(",", ":"), sort_keys=True) if tags else ""
        res = run_script(
            self.client, SCRIPTS["fill"], [self.keyspace.entry(entry.key)],
            [entry.generation, max(1, int(ttl * 1000)), value or b"", "1" if negative else "0", snap],
        )
        return res not in (0, b"0", "0", None)

    def invalidate(self, key: str, tombstone_ttl: float = 60.0) -> None:
        check_name(key)
        run_script(self.client, SCRIPTS["invalidate"], [self.keyspace.entry(key)],
                   [max(1, int(tombstone_ttl * 1000))])

    def tag_versions(self, tags: Iterable[str]) -> dict[str, str]:
        """Current counters of these tags (created when missing): record them before loading."""
        return {t: _s(run_script(self.client, SCRIPTS["ensure_tag"], [self.keyspace.tag(t)], [])) or ""
                for t in tags}

    def bump_tag(self, tag: str) -> str:
        check_name(tag, "tag")
        return _s(run_script(self.client, SCRIPTS["bump_tag"], [self.keyspace.tag(tag)], [])) or ""

    def tags_valid(self, entry: Entry) -> bool:
        """True when every tag the entry was computed under still has the counter it recorded."""
        if not entry.tags:
            return True
        names = list(entry.tags)
        current = self.client.mget([self.keyspace.tag(t) for t in names])  # type: ignore[attr-defined]
        return all(_s(c) == entry.tags[t] for t, c in zip(names, current, strict=True))
