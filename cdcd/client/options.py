"""Typed options with documented defaults.

:class:`EntryOptions` say how one entry is cached (every field can be overridden per call with
``options=`` or, for ``ttl``, directly); :class:`CacheOptions` say how the cache talks to Redis and
how big L1 may grow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from cdcd.durations import parse_duration

Duration = float | str
"""Seconds, or a duration string as in the YAML rules: ``90``, ``"90s"``, ``"10m"``, ``"2h"``, ``"1d"``, ``"250ms"``."""


def _durations(obj: Any, names: tuple[str, ...]) -> None:
    """Turn the duration fields given as strings into seconds (a frozen dataclass: at construction only)."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, str):
            object.__setattr__(obj, name, parse_duration(v))


@dataclass(frozen=True, slots=True)
class EntryOptions:
    """How one entry is cached.

    A value's life, from its load: *fresh* until ``soft_ttl`` (served as is; XFetch may refresh
    it a little early), *stale* until ``ttl`` (served at once while one background refresh runs:
    stale-while-revalidate), *expired* after ``ttl`` (reloaded before returning; kept in L1 only
    as the fail-safe fallback, until ``fail_safe_max_age`` past expiry). An entry found in L2
    keeps the age it has there: a process that reads it late does not make it younger.
    """

    ttl: float = 300.0
    """Seconds a value lives in L2 (Redis, jittered): its hard TTL."""
    l1_ttl: float | None = None
    """Seconds L1 may serve a copy before re-reading L2 (default: ``ttl``). The backplane normally
    drops a changed key within milliseconds; this bounds L1 staleness when it cannot (docs/client.md)."""
    soft_ttl: float | None = None
    """Seconds after which a value is served stale while one background refresh runs (default:
    ``ttl``, i.e. no stale-while-revalidate)."""
    jitter: float = 0.1
    """Every TTL written is multiplied by a random factor in [1 - jitter, 1 + jitter] so entries
    filled together do not expire together."""
    early_refresh_beta: float = 1.0
    """XFetch (Vattani et al. 2015) eagerness: refresh early with probability
    ``exp(-time_to_soft_expiry / (load_time * beta))``. 0 turns it off."""
    cache_negative: bool = True
    """Cache a loader's "not found" (``NOT_FOUND``, or ``None`` with ``none_is_not_found``) through
    the same fill guard, so an insert between token and fill wins. Errors are never cached."""
    negative_ttl: float = 30.0
    """Seconds a "not found" lives (short: inserts normally invalidate it, this bounds the rest)."""
    none_is_not_found: bool = True
    """A loader returning ``None`` means "not found" (else ``None`` is cached as a value)."""
    fail_safe: bool = True
    """Serve the last known value when the loader fails or times out, or Redis is unreachable."""
    fail_safe_max_age: float = 3600.0
    """How long past its expiry a value may still be served by fail-safe; after that the error surfaces."""
    fail_safe_throttle: float = 1.0
    """After a fail-safe, keep serving the fallback this many seconds before calling the failing loader
    (or Redis) again, so an outage does not turn every request into a failing call."""
    loader_soft_timeout: float | None = None
    """With a fail-safe value at hand, wait at most this long for the loader, serve the old value, and
    let the loader finish in the background and update the cache."""
    loader_hard_timeout: float | None = None
    """Give up on the loader after this long even without a fallback (``TimeoutError``; the loader keeps
    running in the background and its result still fills the cache)."""
    distributed_lock: bool = False
    """Coalesce misses across processes too, with a short Redis lock (SET NX PX)."""
    lock_ttl: float = 5.0
    """The lock's lifetime: a holder that dies blocks the others at most this long."""
    decode: Callable[[Any], Any] | None = None
    """Applied to values the *daemon* wrote (its JSON projections of ``update`` rules) after ``json.loads``,
    e.g. ``User.model_validate``, so they come back as the type the loader returns (see docs/client-values.md).
    Values applications wrote come back as they went in and never pass through it."""

    if TYPE_CHECKING:  # what callers may pass: durations as seconds or strings ("10m"); the fields hold seconds
        def __init__(self, ttl: Duration = ..., l1_ttl: Duration | None = ..., soft_ttl: Duration | None = ...,
                     jitter: float = ..., early_refresh_beta: float = ..., cache_negative: bool = ...,
                     negative_ttl: Duration = ..., none_is_not_found: bool = ..., fail_safe: bool = ...,
                     fail_safe_max_age: Duration = ..., fail_safe_throttle: Duration = ...,
                     loader_soft_timeout: Duration | None = ..., loader_hard_timeout: Duration | None = ...,
                     distributed_lock: bool = ..., lock_ttl: Duration = ...,
                     decode: Callable[[Any], Any] | None = ...) -> None: ...

    def __post_init__(self) -> None:
        _durations(self, _ENTRY_DURATIONS)

    def merged(self, **changes: object) -> EntryOptions:
        """A copy with the non-None ``changes`` (``self`` when there are none: the common, cheap case)."""
        given = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given) if given else self  # type: ignore[arg-type]

    @property
    def l1_hard(self) -> float:
        return self.l1_ttl if self.l1_ttl is not None else self.ttl

    @property
    def l1_soft(self) -> float:
        return min(self.soft_ttl, self.l1_hard) if self.soft_ttl is not None else self.l1_hard

    @property
    def soft(self) -> float:
        return min(self.soft_ttl, self.ttl) if self.soft_ttl is not None else self.ttl


@dataclass(frozen=True, slots=True)
class HotKeyOptions:
    """Hot-key detection (docs/hot-keys.md): a bounded top-K sketch of the keys this process reads, published
    to Redis so ``cdcd status`` shows the fleet's hot set and ``cdcd warm --hot`` can fill it."""

    sample: int = 8
    """Count one read in ``sample`` on average (randomly spaced, so a periodic access pattern cannot alias
    with it); 1 counts every read. Scores are scaled back up, so they estimate reads per second."""
    capacity: int = 1024
    """Counters in the sketch (its memory bound): every key read more than ``1/(capacity+1)`` of the
    sampled reads in a window is guaranteed to be tracked."""
    top: int = 100
    """Keys published (and exported) per window."""
    publish_every: float = 10.0
    """Seconds per window: the sketch is published and restarted at the end of each one."""
    publish: bool = True
    """Publish to Redis (off: the sketch is only readable in process, ``cache.hot_keys.top()``)."""
    max_key_length: int = 512
    """Keys longer than this are not counted (an application reading huge generated keys cannot bloat the
    published set)."""

    if TYPE_CHECKING:
        def __init__(self, sample: int = ..., capacity: int = ..., top: int = ..., publish_every: Duration = ...,
                     publish: bool = ..., max_key_length: int = ...) -> None: ...

    def __post_init__(self) -> None:
        _durations(self, ("publish_every",))
        if self.sample < 1 or self.capacity < 1 or self.top < 1 or self.publish_every <= 0:
            raise ValueError("hot keys: sample, capacity and top must be >= 1 and publish_every > 0")


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """How the cache talks to Redis and how big L1 may grow."""

    prefix: str = ""
    """The keyspace prefix of the daemon's rules (``keyspace.prefix``), e.g. ``v1:``."""
    channel: str | None = None
    """Backplane channel (default ``<prefix>#cdcd:bp``, as the daemon's)."""
    l1_max_entries: int = 100_000
    """0 turns L1 off (every read goes to Redis)."""
    l1_max_bytes: int = 256 * 1024 * 1024
    """Bound on the memory L1 holds: entries are sized by their object graph (``cdcd.client.sizing``), within
    about 1.2x of real RSS growth (docs/l1-memory.md)."""
    redis_timeout: float = 0.5
    """Socket timeout of every Redis call (the cache's connections never retry on their own): a dead
    Redis costs at most this per call until the breaker opens, then nothing."""
    connect_timeout: float | None = None
    """Socket connect timeout (default: ``redis_timeout``)."""
    breaker_failures: int = 3
    """Consecutive Redis failures that open the circuit breaker."""
    breaker_reset: float = 2.0
    """Seconds the breaker stays open before one probe call is let through."""
    lease_ttl: float = 10.0
    """Fill-token lease lifetime: a loader slower than this cannot fill L2 (its value is still returned)."""
    tombstone_ttl: float = 60.0
    """Lifetime of the tombstone ``delete`` leaves (it keeps the key's version; fills in flight fail)."""
    subscribe: bool = True
    """Listen to the backplane (drop L1 copies the daemon or other processes changed)."""
    publish: bool = True
    """Announce this process's own set/delete/invalidate_tag on the backplane."""
    backplane_ping: float = 1.0
    """Seconds between PINGs on the backplane connection; no answer within ``2 * backplane_ping +
    redis_timeout`` counts as a lost connection (a silent network partition is noticed, not waited out)."""
    registry_refresh: float = 60.0
    """Seconds between reloads of the daemon's rules registry (table tags for TRUNCATE)."""
    require_registry: bool = True
    """Without the daemon's registry in Redis (Redis restarted empty and the daemon has not restored it
    yet), entries cannot be checked against TRUNCATE, so reads miss and nothing is cached. Turn off only
    when no daemon serves this prefix (the cache is then filled and invalidated by the application alone)."""
    lock_poll: float = 0.02
    """Seconds between L2 checks while another process holds the load lock."""
    ryw_timeout: float = 1.0
    """Read-your-writes: how long a read with a position waits for the daemon to apply it
    (docs/read-your-writes.md)."""
    ryw_on_timeout: Literal["bypass", "raise"] = "bypass"
    """Read-your-writes, when the position was not applied in time: ``bypass`` calls the loader (the
    database) without caching its result (``get`` returns its default: a miss); ``raise`` raises
    ``NotApplied``. Never an older value."""
    background_workers: int = 4
    """Threads for background refreshes and timed loaders (sync cache)."""
    l1_copy: bool = False
    """Every caller gets its own copy of an L1 value (FusionCache's AutoClone): L1 keeps the encoded bytes and
    decodes them on each hit, so a caller mutating its result (or the loader's object) never changes what
    others get. Off: every caller shares L1's one object (treat it as read-only), and a hit costs no decode."""
    entry: EntryOptions = field(default_factory=EntryOptions)
    """Defaults for every entry."""
    hot_keys: HotKeyOptions | None = None
    """Opt in to hot-key detection and publishing (:class:`HotKeyOptions`, docs/hot-keys.md). Off (None)
    the read path does not change at all."""
    cluster_pubsub: Literal["sharded", "classic"] = "sharded"
    """On Redis Cluster, how the backplane travels: ``sharded`` (SSUBSCRIBE/SPUBLISH on the channel's shard)
    or ``classic`` (PUBLISH, broadcast to every node). Must match the daemon's ``redis.pubsub``."""
    read_replicas: bool = False
    """Read a random replica copy of keys the daemon's rules replicate (``replicas: N``), spreading a hot key's
    reads over N hash slots (docs/hot-keys.md). Off: the primary entry, as without replicas."""
    replica_memory: int = 100_000
    """With ``read_replicas``: replicated keys whose newest seen version this process remembers (LRU), so it
    never goes back to an older copy. A key evicted from it may be read from a copy older than one seen before
    (at most what one in-flight change's copies differ by)."""

    if TYPE_CHECKING:  # durations as seconds or strings, as for EntryOptions
        def __init__(self, prefix: str = ..., channel: str | None = ..., l1_max_entries: int = ...,
                     l1_max_bytes: int = ..., redis_timeout: Duration = ..., connect_timeout: Duration | None = ...,
                     breaker_failures: int = ..., breaker_reset: Duration = ..., lease_ttl: Duration = ...,
                     tombstone_ttl: Duration = ..., subscribe: bool = ..., publish: bool = ...,
                     backplane_ping: Duration = ..., registry_refresh: Duration = ..., require_registry: bool = ...,
                     lock_poll: Duration = ..., ryw_timeout: Duration = ...,
                     ryw_on_timeout: Literal["bypass", "raise"] = ..., background_workers: int = ...,
                     l1_copy: bool = ..., entry: EntryOptions = ...,
                     hot_keys: HotKeyOptions | None = ...,
                     cluster_pubsub: Literal["sharded", "classic"] = ..., read_replicas: bool = ...,
                     replica_memory: int = ...) -> None: ...

    def __post_init__(self) -> None:
        _durations(self, _CACHE_DURATIONS)
        if "#" in self.prefix:
            raise ValueError("prefix may not contain '#': cdcd's own keys live under '<prefix>#'")
        if self.replica_memory < 1:
            raise ValueError("replica_memory must be >= 1 (keys whose newest seen version is remembered)")

    @property
    def connect_timeout_s(self) -> float:
        return self.connect_timeout if self.connect_timeout is not None else self.redis_timeout


_ENTRY_DURATIONS = ("ttl", "l1_ttl", "soft_ttl", "negative_ttl", "fail_safe_max_age", "fail_safe_throttle",
                    "loader_soft_timeout", "loader_hard_timeout", "lock_ttl")
_CACHE_DURATIONS = ("redis_timeout", "connect_timeout", "breaker_reset", "lease_ttl", "tombstone_ttl", "backplane_ping",
                    "registry_refresh", "lock_poll", "ryw_timeout")
assert {f.name for f in fields(EntryOptions)} >= set(_ENTRY_DURATIONS)
assert {f.name for f in fields(CacheOptions)} >= set(_CACHE_DURATIONS)
