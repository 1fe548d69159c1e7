"""cdcd's client library: a two-tier cache (in-process L1 + Redis L2) that obeys the daemon's versions.

Importable with only ``redis`` installed::

    from cdcd.client import Cache, CacheOptions, EntryOptions, NOT_FOUND

    cache = Cache("redis://127.0.0.1:6379/0", CacheOptions(prefix="v1:"))
    user = cache.get_or_load("user:42", lambda: db.fetch_user(42), ttl=300, tags=["tenant:7"])
"""

from cdcd.client.aio import AsyncCache
from cdcd.client.cache import Cache, L2Unavailable
from cdcd.client.options import CacheOptions, EntryOptions
from cdcd.client.protocol import NOT_FOUND
from cdcd.client.serializers import JsonSerializer, MsgpackSerializer, Serializer
from cdcd.client.stats import Stats

__all__ = ["NOT_FOUND", "AsyncCache", "Cache", "CacheOptions", "EntryOptions", "JsonSerializer", "L2Unavailable",
           "MsgpackSerializer", "Serializer", "Stats"]
