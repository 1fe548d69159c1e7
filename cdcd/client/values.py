"""How a value crosses the tiers: encoded once at ``set``/fill time, decoded by its writer's format.

Shared by the sync and async caches (no I/O). Three rules:

* A value the serializer cannot store exactly fails **at set/fill time** with :class:`UnencodableValue`
  (a ``TypeError`` naming the key and the type), never later and never as a silently changed value.
* An entry is decoded by **who wrote it** (the entry's ``s`` field): the daemon writes JSON projections
  (``cdc``), read with ``json.loads`` and then the caller's ``decode`` hook (:attr:`EntryOptions.decode`)
  if any; applications write the cache's serializer format (``app``). An entry that does not decode (an
  older client's JSON, a newer format, a type registered elsewhere) is a miss and is reloaded.
* With ``CacheOptions.l1_copy`` L1 keeps the encoded bytes (:class:`Frozen`) and every caller gets its
  own freshly decoded copy; otherwise every caller shares L1's one object (read-only by convention).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cdcd.fillguard import Entry

from ._log import log
from .protocol import MISSING, NOT_FOUND
from .serializers import Serializer


class UnencodableValue(TypeError):
    """The serializer cannot store this value exactly. Raised by ``set`` and ``get_or_load`` (the loader's
    result); never served from a fail-safe fallback, since retrying cannot fix it."""


def encode(serializer: Serializer, key: str, value: Any) -> bytes:
    try:
        return serializer.dumps(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodableValue(f"cannot cache {key!r}: {exc}") from exc


class Frozen:
    """A value kept as bytes in L1 (``l1_copy``): every :meth:`thaw` returns a new, equal object."""

    __slots__ = ("data", "loads")

    def __init__(self, loads: Callable[[bytes], Any], data: bytes) -> None:
        self.loads, self.data = loads, data

    def thaw(self) -> Any:
        return self.loads(self.data)


def thaw(value: Any) -> Any:
    return value.thaw() if type(value) is Frozen else value


def projection_loads(hook: Callable[[Any], Any] | None) -> Callable[[bytes], Any]:
    """How the daemon's JSON projections are read: ``json.loads``, then the caller's hook."""
    if hook is None:
        return json.loads
    return lambda data: hook(json.loads(data))


def decode_entry(serializer: Serializer, entry: Entry, hook: Callable[[Any], Any] | None, copy: bool) -> Any:
    """The entry's value (``NOT_FOUND`` for a cached "not found"; a :class:`Frozen` when ``copy``), or
    MISSING when it does not decode in its writer's format."""
    if entry.negative:
        return NOT_FOUND
    data = entry.value or b""
    loads = projection_loads(hook) if entry.writer == "cdc" else serializer.loads
    try:
        value = loads(data)
    except Exception as exc:
        log.warning("undecodable_value", key=entry.key, writer=entry.writer, error=str(exc))
        return MISSING
    return Frozen(loads, data) if copy else value


def frozen_or(value: Any, serializer: Serializer, data: bytes, copy: bool) -> Any:
    """What L1 keeps (and a load hands its callers) for a value this process encoded as ``data``."""
    return Frozen(serializer.loads, data) if copy and value is not NOT_FOUND else value
