"""The client's side of existence filters: "is this key definitely absent?" before L2 and the loader.

The daemon keeps a Bloom filter of a table's keys in Redis (docs/existence-filter.md). A check is one
``EVALSHA exists_check`` with the key's ``k`` bit offsets, computed here with the daemon's own hashing
(:mod:`cdcd.bloom`): the script reads the filter's meta and bits in one atomic call and answers 1
(maybe present), 0 (definitely absent) or the active filter's ``(m, k)`` when this process's are not
its (the first check, or the rules resized the filter): then it asks once more with those.

Every doubt is "maybe": an unseeded filter, a lost bitmap, Redis unreachable, an unexpected reply. Only a
filter that says 0 makes the caller skip Redis entries and the loader. Sans I/O apart from the two small
drivers at the end, which take the cache's own ``call``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cdcd.bloom import positions
from cdcd.keyspace import SCRIPTS, Keyspace

from .link import Command, L2Unavailable
from .stats import Stats

_CHECK = SCRIPTS["exists_check"]


class ExistenceFilters:
    """The parameters of each table's active filter, as last learned from Redis (one dict per cache)."""

    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace
        self.params: dict[str, tuple[int, int]] = {}

    def command(self, table: str, key: str) -> Command:
        m, k = self.params.get(table, (0, 0))
        offsets = positions(key, m, k) if m else ()
        return ("EVALSHA", _CHECK.sha, 3, *self.keyspace.exists_filter(table), m, k, *offsets)

    def verdict(self, table: str, reply: Any) -> bool | None:
        """True: definitely absent. False: maybe present. None: parameters learned, check again."""
        if reply == 0:
            return True
        if isinstance(reply, list) and len(reply) == 2:
            try:
                params = int(reply[0]), int(reply[1])
            except (TypeError, ValueError):
                return False
            if params[0] > 0 and params[1] > 0 and params != self.params.get(table):
                self.params[table] = params
                return None
        return False


Call = Callable[[Sequence[Command]], list[Any]]
AsyncCall = Callable[[Sequence[Command]], Awaitable[list[Any]]]


def absent(filters: ExistenceFilters, call: Call, stats: Stats, table: str, key: str) -> bool:
    """True when the table's filter says ``key`` does not exist; False on any doubt."""
    for _ in range(2):
        try:
            reply = call([filters.command(table, key)])[0]
        except L2Unavailable:
            return False
        out = filters.verdict(table, reply)
        if out is not None:
            stats.exists_absent += out
            return out
    return False


async def aabsent(filters: ExistenceFilters, call: AsyncCall, stats: Stats, table: str, key: str) -> bool:
    """:func:`absent` for :class:`cdcd.client.AsyncCache`."""
    for _ in range(2):
        try:
            reply = (await call([filters.command(table, key)]))[0]
        except L2Unavailable:
            return False
        out = filters.verdict(table, reply)
        if out is not None:
            stats.exists_absent += out
            return out
    return False
