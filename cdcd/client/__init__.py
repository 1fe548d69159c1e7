"""cdcd's client library: a two-tier cache (in-process L1 + Redis L2) that obeys the daemon's versions.

Importable with only ``redis`` and ``msgpack`` installed (structlog and prometheus_client are used when
present). Values come back from every tier as they went in (docs/client-values.md)::

    from cdcd.client import Cache, CacheOptions, EntryOptions, NOT_FOUND

    cache = Cache("redis://127.0.0.1:6379/0", CacheOptions(prefix="v1:"))
    user = cache.get_or_load("user:42", lambda: db.fetch_user(42), ttl=300, tags=["tenant:7"])

``AsyncCache`` is the same over ``redis.asyncio``.
"""

from .aio import AsyncCache
from .breaker import CircuitBreaker
from .cache import Cache
from .consistency import (
    NotApplied,
    acommit_position,
    commit_position,
    format_position,
    parse_position,
    read_your_writes,
)
from .hotkeys import HotKeys
from .link import L2Unavailable
from .options import CacheOptions, EntryOptions, HotKeyOptions
from .protocol import NOT_FOUND
from .serializers import JsonSerializer, MsgpackSerializer, RawSerializer, Serializer
from .stats import Stats
from .typed import TypedSerializer
from .values import UnencodableValue

__all__ = ["NOT_FOUND", "AsyncCache", "Cache", "CacheOptions", "CircuitBreaker", "EntryOptions", "HotKeyOptions",
           "HotKeys", "JsonSerializer", "L2Unavailable", "MsgpackSerializer", "NotApplied", "RawSerializer",
           "Serializer", "Stats", "TypedSerializer", "UnencodableValue", "acommit_position", "commit_position",
           "format_position", "parse_position", "read_your_writes"]
