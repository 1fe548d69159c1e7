"""A Django cache backend on cdcd's client: ``django.core.cache``, ``cache_page`` and template fragment
caching get L1 + L2, the backplane and the fill guard.

Why a backend and not just ``Cache``: Django code (and third-party apps) talk to ``django.core.cache``.
With this backend, the keys they cache are the keys the daemon's rules invalidate: a Django ORM write
commits, the daemon writes a tombstone at the commit's version, every process drops its L1 copy, and a
slow request that read the old row before the commit cannot write it back (the fill guard).

Settings::

    CACHES = {
        "default": {
            "BACKEND": "cdcd.client.django_cache.CdcdCache",
            "LOCATION": "redis://127.0.0.1:6379/0",
            "TIMEOUT": 300,
            "OPTIONS": {"prefix": "v1:", "l1_max_entries": 10000},  # any CacheOptions field
        }
    }

Keys: with the default ``KEY_PREFIX`` ("") and ``VERSION`` (1) a Django key is used as is, so
``cache.get("user:42")`` reads the entry the daemon writes for rule ``user:{id}``. A non-default prefix
or version gives ``<KEY_PREFIX>:<version>:<key>`` (Django's own layout), which rules do not write.
Where the backend differs from Django's Redis backend is in docs/django.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from .cache import Cache
from .options import CacheOptions

FOREVER = 10 * 365 * 86400.0  # Django's timeout=None ("never expires"): Redis entries always carry a TTL


def cdcd_key(key: str, key_prefix: str, version: int) -> str:
    """Django's key function, except that the default prefix and version leave the key as is, and a
    ``#`` becomes ``%23`` (what the daemon renders for a ``#`` in a column value; a raw ``#`` is cdcd's
    own namespace)."""
    key = str(key).replace("#", "%23")
    if key_prefix or int(version) != 1:
        return f"{key_prefix.replace('#', '%23')}:{version}:{key}"
    return key


class CdcdCache(BaseCache):
    """``django.core.cache`` over :class:`cdcd.client.Cache` (one per backend instance, thread-safe)."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        params = dict(params)
        params.setdefault("KEY_FUNCTION", cdcd_key)
        super().__init__(params)
        location = server[0] if isinstance(server, (list, tuple)) else server.split(",")[0]
        options = dict(params.get("OPTIONS", {}))
        self._options = CacheOptions(**options)
        self._location = location or "redis://127.0.0.1:6379/0"
        self._cache: Cache | None = None

    @property
    def cache(self) -> Cache:
        """The client, created on first use (Django builds backends at import time in some setups)."""
        if self._cache is None:
            self._cache = Cache(self._location, self._options)
        return self._cache

    def _ttl(self, timeout: Any) -> float | None:
        """Seconds to keep an entry; None when Django asked for no entry at all (timeout <= 0)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return FOREVER
        return float(timeout) if float(timeout) > 0 else None

    # ------------------------------------------------------------------ reads

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self.cache.get(self.make_and_validate_key(key, version=version), default)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        missing = object()
        found = {}
        for k in keys:
            value = self.get(k, missing, version=version)
            if value is not missing:
                found[k] = value
        return found

    def has_key(self, key: Any, version: int | None = None) -> bool:
        missing = object()
        return self.get(key, missing, version=version) is not missing

    def get_or_set(self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> Any:
        """Through the fill guard with single flight: concurrent callers in this process run ``default``
        once; a fill that raced a database change is refused (the caller still gets its value)."""
        ttl = self._ttl(timeout)
        if ttl is None:
            return default() if callable(default) else default
        k = self.make_and_validate_key(key, version=version)
        return self.cache.get_or_load(k, default if callable(default) else (lambda: default), ttl=ttl)

    # ------------------------------------------------------------------ writes

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        k = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:
            self.cache.delete(k)
            return
        self.cache.set(k, value, ttl=ttl)

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """Store only if nothing is cached. Atomic across processes: it is a fill through the guard, so of
        two concurrent adds only the one whose fill lands first stores (in one process, single flight
        runs one of them)."""
        k = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:
            return False
        stored = []

        def load() -> Any:
            stored.append(True)
            return value

        self.cache.get_or_load(k, load, ttl=ttl)
        return bool(stored)

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Read (from Redis, not this process's L1, which may trail another process's write by the
        backplane's milliseconds), add, write through the guard. Not atomic against a concurrent incr in
        another process (one update can be lost): counters belong in Redis ``INCR``, not in a cache of
        database rows. ValueError when nothing is cached, as in Django."""
        k = self.make_and_validate_key(key, version=version)
        self.cache.l1.remove(k)
        missing = object()
        value = self.cache.get(k, missing)
        if value is missing:
            raise ValueError(f"Key '{key}' not found")
        new = value + delta
        self.cache.set(k, new, ttl=self._ttl(DEFAULT_TIMEOUT) or FOREVER)
        return new

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """A new expiry for a cached value: re-written through the guard (False if none is cached, or a
        change invalidated it meanwhile)."""
        k = self.make_and_validate_key(key, version=version)
        missing = object()
        value = self.cache.get(k, missing)
        if value is missing:
            return False
        ttl = self._ttl(timeout)
        if ttl is None:
            self.cache.delete(k)
            return True
        return self.cache.set(k, value, ttl=ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        """A tombstone, as the daemon writes (fills in flight fail). Django expects "was there a value":
        that is answered from a read just before, so it is best effort under concurrency."""
        k = self.make_and_validate_key(key, version=version)
        missing = object()
        had = self.cache.get(k, missing) is not missing
        self.cache.delete(k)
        return had

    def set_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> list[Any]:
        for key, value in data.items():
            self.set(key, value, timeout, version=version)
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        for key in keys:
            self.delete(key, version=version)

    def clear(self) -> None:
        """Every entry under the keyspace prefix is invalidated as :meth:`delete` does (a tombstone and a
        backplane message, so fills in flight fail and every process drops its L1 copy). O(entries):
        SCAN, then one round trip per key; cdcd's own keys (``<prefix>#...``) are left alone."""
        cache = self.cache
        prefix = cache.keyspace.prefix
        for raw in cache.redis.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            name = raw.decode() if isinstance(raw, bytes) else raw
            key = name[len(prefix):]
            if key and not key.startswith("#"):
                cache.delete(key)
        cache.reset_l1("django cache.clear()")

    def close(self, **kwargs: Any) -> None:
        """Django calls this at the end of each request: the client is long-lived, so nothing to do."""

    def shutdown(self) -> None:
        """Stop the client's subscriber and background workers (tests, process exit)."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


__all__ = ["FOREVER", "CdcdCache", "cdcd_key"]
