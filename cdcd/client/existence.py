"""The client's side of existence filters: "is this key definitely absent?" before L2 and the loader.

The daemon keeps a Bloom filter of a table's keys in Redis (docs/existence-filter.md). A check is one
``EVALSHA exists_check`` with the key's ``k`` bit offsets, computed here with the daemon's own hashing
(:mod:`cdcd.bloom`): the script reads the filter's meta and bits in one atomic call and answers 1
(maybe present), 0 (definitely absent) or the active filter's parameters (bits, hash count, key
template) when this process's are not its (the first check, or the rules changed the filter): then it
asks once more with those. A key the filter's template does not render (``user:email:a@x`` asked of a
filter of ``user:{id}``) is a programming error, raised as ``ValueError``: the filter knows nothing of
it and would answer "absent" for rows that exist.

Every doubt is "maybe": an unseeded filter, a lost bitmap, Redis unreachable, an unexpected reply. Only a
filter that says 0 makes the caller skip Redis entries and the loader. Without I/O: the check is the
flow :func:`check`, a step of the cache's miss flow that either driver runs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from cdcd.bloom import parse_params_id, positions
from cdcd.keys import Template
from cdcd.keyspace import SCRIPTS, Keyspace

from .link import Command, L2Unavailable
from .stats import Stats
from .steps import Step, call, run

_CHECK = SCRIPTS["exists_check"]


@dataclass(frozen=True, slots=True)
class _Params:
    text: str  # cdcd.bloom.params_id, as the filter's meta holds it
    m: int
    k: int
    template: Template


class ExistenceFilters:
    """The parameters of each table's active filter, as last learned from Redis (one dict per cache)."""

    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace
        self.params: dict[str, _Params] = {}

    def command(self, table: str, key: str) -> Command:
        p = self.params.get(table)
        if p is None:
            return ("EVALSHA", _CHECK.sha, 3, *self.keyspace.exists_filter(table), "")
        if p.template.match(key) is None:
            raise ValueError(f"{key!r} is not a key of the existence filter of {table} ({p.template.text}): it cannot "
                             f"tell whether that key exists")
        return ("EVALSHA", _CHECK.sha, 3, *self.keyspace.exists_filter(table), p.text, *positions(key, p.m, p.k))

    def verdict(self, table: str, reply: Any) -> bool | None:
        """True: definitely absent. False: maybe present. None: parameters learned, check again."""
        if reply == 0:
            return True
        if isinstance(reply, list) and len(reply) == 1:
            raw = reply[0]
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                m, k, template = parse_params_id(text)
                params = _Params(text, m, k, Template.parse(template))
            except ValueError:
                return False
            if m > 0 and k > 0 and params != self.params.get(table):
                self.params[table] = params
                return None
        return False


def check(filters: ExistenceFilters, stats: Stats, table: str, key: str) -> Generator[Step, Any, bool]:
    """True when the table's filter says ``key`` does not exist; False on any doubt. A step of the cache's
    miss flow (:meth:`.core.CacheCore.get_or_load`), so both drivers run this one implementation."""
    for _ in range(2):
        try:
            reply = (yield call([filters.command(table, key)]))[0]
        except L2Unavailable:
            return False
        out = filters.verdict(table, reply)
        if out is not None:
            stats.exists_absent += out
            return out
    return False


class _Calls:
    """A bare ``call`` function in the place of a link (what :func:`.steps.run` sends a ``CALL`` to)."""

    __slots__ = ("call",)

    def __init__(self, call: Callable[[Sequence[Command]], list[Any]]) -> None:
        self.call = call


def _no_other_step(step: Any) -> Any:
    raise TypeError(f"an existence check yields only Redis calls, not {step!r}")


def absent(filters: ExistenceFilters, call: Callable[[Sequence[Command]], list[Any]], stats: Stats, table: str,
           key: str) -> bool:
    """:func:`check` with a blocking ``call`` (a link's ``call``), for tools and tests outside a cache."""
    return run(check(filters, stats, table, key), _no_other_step, _Calls(call))
