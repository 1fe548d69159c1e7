"""Typed options with documented defaults. Every field is a per-call override too (``get_or_load(..., options=)``)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class EntryOptions:
    """How one entry is cached.

    Lifetimes, from a value's load: *fresh* until ``soft_ttl`` (returned as is; XFetch may refresh it a
    little early), *stale* until ``ttl`` (returned at once while one background refresh runs:
    stale-while-revalidate), *expired* after ``ttl`` (reloaded before returning; kept only as the
    fail-safe fallback until ``fail_safe_max_age`` past expiry).
    """

    ttl: float = 300.0
    """Seconds an entry lives in L2 (Redis, jittered) and, at most, in L1 before it must be reloaded."""
    l1_ttl: float | None = None
    """Seconds an entry lives in L1 (default: ``ttl``). The worst-case L1 staleness when the backplane
    loses a message without anyone noticing."""
    soft_ttl: float | None = None
    """Seconds after which a value is served stale while one background refresh runs (default: no
    stale-while-revalidate: ``soft_ttl = l1_ttl``)."""
    jitter: float = 0.1
    """Every TTL written is multiplied by a random factor in [1 - jitter, 1 + jitter] so entries
    filled together do not expire together."""
    early_refresh_beta: float = 1.0
    """XFetch (Vattani et al. 2015) eagerness: refresh early with probability growing as expiry nears,
    scaled by how long the last load took. 0 turns it off."""
    cache_negative: bool = True
    """Cache a loader's "not found" (``NOT_FOUND``, or ``None`` with ``none_is_not_found``). Errors never are."""
    negative_ttl: float = 30.0
    none_is_not_found: bool = True
    fail_safe: bool = True
    """Serve the last known value when the loader fails or times out (or Redis is down and L1 has it)."""
    fail_safe_max_age: float = 3600.0
    """How long past its expiry a value may still be served by fail-safe; after that the error surfaces."""
    loader_soft_timeout: float | None = None
    """With a fail-safe value at hand, wait at most this long for the loader, serve the old value, and let
    the loader finish in the background and update the cache."""
    loader_hard_timeout: float | None = None
    """Give up on the loader after this long even without a fallback (the loader keeps running in the
    background; its result still fills the cache)."""
    distributed_lock: bool = False
    """Coalesce misses across processes too, with a short Redis lock (SET NX PX)."""
    lock_ttl: float = 5.0
    """The lock's lifetime: a holder that dies blocks others at most this long."""

    def merged(self, **changes: object) -> EntryOptions:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    @property
    def l1_hard(self) -> float:
        return self.l1_ttl if self.l1_ttl is not None else self.ttl

    @property
    def l1_soft(self) -> float:
        return min(self.soft_ttl, self.l1_hard) if self.soft_ttl is not None else self.l1_hard


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """How the cache talks to Redis and how big L1 may grow."""

    prefix: str = ""
    """The keyspace prefix of the daemon's rules (``keyspace.prefix``), e.g. ``v1:``."""
    channel: str | None = None
    """Backplane channel (default ``<prefix>__cdcd:bp``, as the daemon)."""
    l1_max_entries: int = 100_000
    l1_max_bytes: int = 256 * 1024 * 1024
    """Approximate: the serialized size of each value is counted."""
    redis_timeout: float = 0.5
    """Socket timeout of every Redis call: a dead Redis costs at most this per call until the breaker opens."""
    breaker_failures: int = 3
    """Consecutive Redis failures that open the circuit breaker."""
    breaker_reset: float = 2.0
    """Seconds the breaker stays open before one probe call is let through."""
    lease_ttl: float = 10.0
    """Fill-token lease lifetime: a loader slower than this cannot fill L2 (its value is still returned)."""
    subscribe: bool = True
    """Listen to the backplane (drop L1 copies the daemon or other processes changed)."""
    publish: bool = True
    """Announce this process's own set/delete/invalidate_tag on the backplane."""
    registry_refresh: float = 60.0
    """Seconds between reloads of the daemon's rules registry (table tags for TRUNCATE)."""
    background_workers: int = 4
    entry: EntryOptions = EntryOptions()
