"""The sync two-tier cache: L1 in process, L2 in Redis, kept honest by the daemon's versions and backplane.

``get_or_load`` in order:

1. L1 fresh -> return (XFetch may start one early background refresh); L1 stale (past the soft
   TTL) -> return at once, one background refresh (stale-while-revalidate).
2. L2, one round trip (entry + fill token, its TTL, the tag counters): a value whose recorded tag
   counters are all current fills L1 and is returned. It keeps its age: a value loaded long ago
   by another process is not fresh again in this one.
3. Miss -> single flight (one loader call per key per process, background refreshes included;
   optionally one per key across processes with a Redis lock); the token and the tag counters
   are taken *before* the loader runs; then FILL through the guard, refused when any change
   reached the key since the token. A refused fill is not an error: the caller gets what it
   loaded, L2 keeps the newer state, and L1 keeps no copy.
4. Loader error or timeout, or Redis unreachable -> the last known value if it is within
   ``fail_safe_max_age`` (fail-safe), else the error. Redis errors feed a circuit breaker; while it
   is open Redis is not called and L1 serves. A key with nothing in L1 is loaded without L2.

L1 inserts are fenced against invalidations that overtake them (see :mod:`cdcd.client.l1`), so a
value read before a change can never be inserted after the change's backplane message.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from time import monotonic
from typing import Any, ParamSpec, TypeVar, cast

import redis

from cdcd.backplane import Message, Sequencer
from cdcd.keys import check_name, render
from cdcd.keyspace import Keyspace

from ._log import log
from .breaker import CircuitBreaker
from .connect import make_link, open_client
from .consistency import (
    ACTIVE,
    REDIS_CHECK_EVERY,
    NotApplied,
    Position,
    Satisfied,
    Watermark,
    ambient_position,
    parse_position,
    read_your_writes,
)
from .decorated import CachedFunction
from .existence import ExistenceFilters, absent
from .hotkeys import HotKeys
from .l1 import L1, L1Entry
from .link import UNLOCK, Command, L2Unavailable
from .options import CacheOptions, Duration, EntryOptions
from .protocol import (
    BUMP,
    INVALIDATE,
    MISSING,
    NOT_FOUND,
    XFETCH_HORIZON,
    Found,
    KeyTemplate,
    Registry,
    all_tags,
    check_names,
    decode_str,
    fill_command,
    fill_result,
    jittered,
    make_entry,
    parse_found,
    read_commands,
    xfetch_due,
)
from .serializers import Serializer
from .stats import Stats
from .typed import TypedSerializer
from .values import UnencodableValue, decode_entry, encode, frozen_or, thaw

__all__ = ["XFETCH_HORIZON", "Cache", "L2Unavailable"]

T = TypeVar("T")
P = ParamSpec("P")
_lock_ids = itertools.count()


def _out(e: L1Entry) -> Any:
    return None if e.negative else e.value


class _Flight:
    """One in-flight load of a key. Lighter than a ``concurrent.futures.Future`` (no condition variable
    per load): the event that waiters block on is created only when somebody waits."""

    __slots__ = ("done", "error", "event", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.event: threading.Event | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Cache:
    """Thread-safe; create one per process and share it.

    ``client`` is a URL or a ``redis.Redis`` whose pool settings (host, TLS, auth, db) are used for
    the cache's own connections, with the cache's timeouts and no retries (see :mod:`.link`).
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster | str = "redis://127.0.0.1:6379/0",
                 options: CacheOptions | None = None,
                 serializer: Serializer | None = None, rng: random.Random | None = None) -> None:
        self.options = opts = options or CacheOptions()
        client = open_client(client)  # a URL: redis+cluster:// is a cluster
        self.redis: Any = client
        self.keyspace = Keyspace(opts.prefix, opts.channel)
        self.serializer: Serializer = serializer or TypedSerializer()
        self._copy = opts.l1_copy
        if self._copy:  # every public read hands out its own copy (see values.Frozen)
            self.get = self._get_copy  # type: ignore[method-assign]
            self.get_or_load = self._get_or_load_copy  # type: ignore[method-assign]
        self.stats = Stats()
        self.l1 = L1(opts.l1_max_entries, opts.l1_max_bytes, self.stats)
        self._l1data = self.l1.data  # bound once: the hit path avoids an attribute hop
        self.breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_reset)
        self.link: Any = make_link(client, opts, self.breaker, self.stats)  # Link, or ClusterLink on a cluster
        self.registry = Registry()
        self._registry_at = -math.inf
        self.exists = ExistenceFilters(self.keyspace)  # docs/existence-filter.md
        self.rng = rng or random.Random()
        self._flights: dict[str, _Flight] = {}
        self._flight_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(opts.background_workers, thread_name_prefix="cdcd-cache")
        self.sequencer = Sequencer("app")
        self._publish_lock = threading.Lock()
        self.watermark = Watermark()
        self.hot_keys = HotKeys.attach(self, opts.hot_keys)  # opt-in: wraps get/get_or_load (docs/hot-keys.md)
        if self.hot_keys is not None:
            self.hot_keys.start_thread(self.link.call_checked)
        self._subscriber: Any = None
        if opts.subscribe:
            from .subscriber import Subscriber

            self._subscriber = Subscriber(self)
            self._subscriber.start()
            # The first subscription resets L1; waiting for it (briefly) keeps early entries.
            self._subscriber.connected.wait(opts.connect_timeout_s + opts.redis_timeout)

    @property
    def run_id(self) -> str:
        """This process's backplane run id (its own messages are ignored by its listener)."""
        return self.sequencer.run

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the listener and the background threads. Loads still queued are abandoned: their
        waiters get ``RuntimeError`` instead of waiting forever."""
        if self._subscriber is not None:
            self._subscriber.stop()
        if self.hot_keys is not None:
            self.hot_keys.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)  # see _submit: queued loads fail their waiters
        self.link.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        """True once the backplane listener is subscribed (False without a listener)."""
        return self._subscriber is not None and bool(self._subscriber.connected.wait(timeout))

    # ---------------------------------------------------------------- Redis plumbing

    @property
    def unverifiable(self) -> bool:
        """No registry in Redis (it restarted empty, or no daemon runs): entries cannot be checked against
        their tables' TRUNCATE counters, so every read is a miss and nothing is cached
        (``require_registry=False`` turns this off for uses without a daemon)."""
        return self.options.require_registry and not self.registry.found

    def _refresh_registry(self) -> None:
        now = monotonic()
        every = self.options.registry_refresh
        if self.unverifiable:
            every = min(every, 1.0)  # Redis lost it: the daemon restores it within a heartbeat
        if now - self._registry_at < every:
            return
        self._registry_at = now
        try:
            self.registry.load(self.link.call_checked([("GET", self.keyspace.registry)])[0])
        except (L2Unavailable, ValueError) as exc:
            log.debug("registry_unavailable", error=str(exc))

    def _read(self, key: str, tags: Sequence[str], lease: bool) -> Found:
        lease_ms = int(self.options.lease_ttl * 1000) if lease else None
        found = parse_found(key, tags, self.link.call(read_commands(self.keyspace, key, tags, lease_ms)))
        extra = found.missing()
        if extra:  # filled by a caller that named other tags: one more round trip
            values = self.link.call_checked([("GET", self.keyspace.tag(t)) for t in extra])
            found.current.update((t, decode_str(v)) for t, v in zip(extra, values, strict=True))
        return found

    def _decode(self, found: Found, opts: EntryOptions) -> Any:
        """The entry's value by its writer's format (``NOT_FOUND`` for a cached "not found"; a
        :class:`~.values.Frozen` with ``l1_copy``); MISSING if it does not decode (a miss: reloaded)."""
        return decode_entry(self.serializer, found.entry, opts.decode, self._copy)

    def _put_from_l2(self, key: str, found: Found, value: Any, opts: EntryOptions, tags: Sequence[str],
                     since: int) -> None:
        if self.l1.max_entries <= 0:
            return
        old = self._l1data.get(key)
        e = make_entry(monotonic(), value, found.entry.negative, opts, found.remaining,
                       [*found.entry.tags, *(t for t in tags if t not in found.entry.tags)],
                       len(found.entry.value or b""), old.delta if old is not None else 0.0,
                       found.entry.generation, self.rng)
        self.l1.put(key, e, since)

    # ---------------------------------------------------------------- reads

    def get(self, key: str, default: Any = None, *, decode: Callable[[Any], Any] | None = None,
            min_position: Position | None = None) -> Any:
        """L1, then L2; never calls a loader. A cached "not found" returns ``default``. ``decode``: see
        :attr:`EntryOptions.decode`.

        ``min_position`` (or a :meth:`read_your_writes` scope): nothing older than that commit; when the
        daemon has not applied it within ``ryw_timeout``, ``default`` (a miss) or ``NotApplied``."""
        if (min_position is not None or ACTIVE[0]) and not self._read_your_writes(key, min_position):
            return default
        e = self._l1data.get(key)
        if e is not None and monotonic() < e.hard:
            e.ref = True
            self.stats.l1_hits += 1
            return default if e.negative else e.value
        self.stats.l1_misses += 1
        check_names(key)
        opts = self.options.entry if decode is None else self.options.entry.merged(decode=decode)
        since = self.l1.begin()
        try:
            self._refresh_registry()
            if self.unverifiable:
                self.stats.l2_misses += 1
                return default
            found = self._read(key, all_tags(key, (), self.registry), lease=False)
        except L2Unavailable:
            cur = self._fallback(key, opts)
            return default if cur is None or cur.negative else self._serve_fallback(key, cur, opts)
        value = self._decode(found, opts) if found.usable else MISSING
        if value is MISSING:
            self.stats.l2_misses += 1
            return default
        self.stats.l2_hits += 1
        self._put_from_l2(key, found, value, opts, (), since)
        return default if value is NOT_FOUND else value

    def get_or_load(self, key: str, loader: Callable[[], T], *, ttl: Duration | None = None,
                    tags: Iterable[str] = (), options: EntryOptions | None = None,
                    decode: Callable[[Any], Any] | None = None, min_position: Position | None = None,
                    exists_filter: str | None = None) -> T:
        """The value of ``key``, loading it with ``loader()`` on a miss (see the module docstring).

        ``loader`` returns the value, or ``NOT_FOUND`` (or ``None``) for "no such row", which is
        cached for ``negative_ttl`` and returned as ``None``. Its exceptions are never cached.
        ``min_position`` (or a :meth:`read_your_writes` scope): nothing older than that commit
        (docs/read-your-writes.md); not applied within ``ryw_timeout``: the loader's value, uncached
        (``ryw_on_timeout="bypass"``), or ``NotApplied``. ``exists_filter``: a table (``users``) whose
        existence filter is asked first; "definitely absent" returns ``None`` at once (docs/existence-filter.md).
        """
        if (min_position is not None or ACTIVE[0]) and not self._read_your_writes(key, min_position):
            value = loader()
            return None if value is NOT_FOUND else value  # type: ignore[return-value]
        e = self._l1data.get(key)
        if e is not None:
            now = monotonic()
            if now < e.early:  # fresh, and far from expiry: the common case, kept lean
                e.ref = True
                self.stats.l1_hits += 1
                return None if e.negative else e.value  # type: ignore[return-value]
            if now < e.soft:  # fresh, inside the XFetch window
                e.ref = True
                self.stats.l1_hits += 1
                beta = (options or self.options.entry).early_refresh_beta
                if beta and e.delta and xfetch_due(e.delta, beta, e.soft - now, self.rng.random()):
                    self.stats.early_refreshes += 1
                    self._background(key, loader, ttl, tags, options, e.generation, decode)
                return _out(e)  # type: ignore[no-any-return]
            if now < e.hard:  # stale-while-revalidate
                self.stats.stale_served += 1
                self._background(key, loader, ttl, tags, options, e.generation, decode)
                return _out(e)  # type: ignore[no-any-return]
        self.stats.l1_misses += 1
        if exists_filter is not None and absent(self.exists, self.link.call, self.stats, exists_filter, key):
            return None  # type: ignore[return-value]  # the table's existence filter: no such row
        result: T = self._miss(key, loader, (options or self.options.entry).merged(ttl=ttl, decode=decode),
                               check_names(key, tags))
        return result

    def _get_copy(self, key: str, default: Any = None, *, decode: Callable[[Any], Any] | None = None,
                  min_position: Position | None = None) -> Any:
        """``get`` with ``l1_copy``: the caller's own copy (bound over ``get`` at construction)."""
        return thaw(Cache.get(self, key, default, decode=decode, min_position=min_position))

    def _get_or_load_copy(self, key: str, loader: Callable[[], T], *, ttl: Duration | None = None,
                          tags: Iterable[str] = (), options: EntryOptions | None = None,
                          decode: Callable[[Any], Any] | None = None, min_position: Position | None = None,
                    exists_filter: str | None = None) -> T:
        """``get_or_load`` with ``l1_copy``: the caller's own copy (bound over ``get_or_load`` at construction)."""
        return thaw(Cache.get_or_load(  # type: ignore[no-any-return]
            self, key, loader, ttl=ttl, tags=tags, options=options, decode=decode, min_position=min_position,
            exists_filter=exists_filter))

    # ---------------------------------------------------------------- miss path

    def _fallback(self, key: str, opts: EntryOptions) -> L1Entry | None:
        """The L1 entry fail-safe may serve now (expired ones included; invalidated ones are gone)."""
        if not opts.fail_safe:
            return None
        e = self._l1data.get(key)
        return e if e is not None and monotonic() < e.keep else None

    def _serve_fallback(self, key: str, e: L1Entry, opts: EntryOptions) -> Any:
        """Fail-safe: serve ``e`` and keep serving it for ``fail_safe_throttle`` without retrying."""
        self.stats.fail_safe += 1
        until = min(monotonic() + opts.fail_safe_throttle, e.keep)
        if until > e.hard:
            t = L1Entry(e.value, until, until, e.keep, e.tags, e.size, e.negative, e.delta, e.generation)
            self.l1.replace(key, e, t)
        return _out(e)

    def _miss(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str]) -> Any:
        fallback = self._fallback(key, opts)
        if fallback is not None and self.breaker.state == "open":
            return self._serve_fallback(key, fallback, opts)  # Redis known down: do not wait for it
        timed = opts.loader_soft_timeout is not None or opts.loader_hard_timeout is not None
        with self._flight_lock:
            fl = self._flights.get(key)
            leader = fl is None
            if fl is None:
                fl = self._flights[key] = _Flight()
            if (not leader or timed) and fl.event is None:
                fl.event = threading.Event()  # somebody will wait for it
        if not leader:
            self.stats.coalesced += 1
        elif timed:
            self._submit(fl, key, loader, opts, tags, None, fallback is not None)
        else:
            self._flight(fl, key, loader, opts, tags, None, fallback is not None)
        timeout = opts.loader_hard_timeout
        if fallback is not None and opts.loader_soft_timeout is not None:
            timeout = opts.loader_soft_timeout
        if not fl.done and not fl.event.wait(timeout):  # type: ignore[union-attr]
            self.stats.loader_timeouts += 1  # the flight goes on and still fills the cache
            cur = self._fallback(key, opts)
            if cur is not None:
                return self._serve_fallback(key, cur, opts)
            raise TimeoutError(f"loader for {key!r} took longer than {timeout}s")
        try:
            result = fl.result()
        except UnencodableValue:
            raise  # a programming error: no fallback hides it
        except L2Unavailable:
            cur = self._fallback(key, opts)
            if cur is not None:
                return self._serve_fallback(key, cur, opts)
            return self._load_without_l2(key, loader, opts, tags, self.l1.begin())
        except Exception:
            cur = self._fallback(key, opts)
            if cur is not None:
                return self._serve_fallback(key, cur, opts)
            raise
        if leader:  # an entry that came back from L2 already stale gets its refresh now
            e = self._l1data.get(key)
            if e is not None and e.soft <= monotonic() < e.hard:
                self._background(key, loader, None, tags, opts, e.generation)
        return result

    def _background(self, key: str, loader: Callable[[], Any], ttl: Duration | None, tags: Iterable[str],
                    options: EntryOptions | None, refresh_of: str | None,
                    decode: Callable[[Any], Any] | None = None) -> None:
        """One background refresh per key: nothing starts while a load or refresh of it is in flight."""
        if key in self._flights:
            return
        with self._flight_lock:
            if key in self._flights:
                return
            fl = self._flights[key] = _Flight()
        self.stats.refreshes += 1
        opts = (options or self.options.entry).merged(ttl=ttl, decode=decode)
        self._submit(fl, key, loader, opts, list(tags), refresh_of or "", False)

    def _submit(self, fl: _Flight, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str],
                refresh_of: str | None, has_fallback: bool) -> None:
        """Run a flight on the pool. If it never runs (the cache closed), its waiters get an error instead
        of waiting forever."""

        def abandoned(job: concurrent.futures.Future[None]) -> None:
            if job.cancelled():
                self._land(key, fl, None, RuntimeError("cache closed"))

        try:
            self._pool.submit(self._flight, fl, key, loader, opts, tags, refresh_of, has_fallback
                              ).add_done_callback(abandoned)
        except RuntimeError as exc:  # already closed
            self._land(key, fl, None, RuntimeError(f"cache closed: {exc}"))

    def _flight(self, fl: _Flight, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str],
                refresh_of: str | None, has_fallback: bool) -> None:
        try:
            result = self._load(key, loader, opts, tags, refresh_of, has_fallback)
        except BaseException as exc:
            self._land(key, fl, None, exc)
            if refresh_of is not None:
                log.debug("background_refresh_failed", key=key, error=str(exc))
            if not isinstance(exc, Exception):
                raise
        else:
            self._land(key, fl, result, None)

    def _land(self, key: str, fl: _Flight, result: Any, error: BaseException | None) -> None:
        """The flight is over: unregister it, then wake whoever waits (under the lock, so no waiter can
        join it after its outcome is set without also finding its event)."""
        with self._flight_lock:
            if self._flights.get(key) is fl:
                del self._flights[key]
            fl.value, fl.error, fl.done = result, error, True
            event = fl.event
        if event is not None:
            event.set()

    def _load(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str],
              refresh_of: str | None, has_fallback: bool) -> Any:
        """One flight: L2 (with the fill token), else the loader and a guarded fill.

        ``refresh_of`` (a background refresh): the generation of the copy being refreshed; an L2 entry
        of another generation is a refresh someone else already did and is adopted, the same one is
        reloaded. ``has_fallback``: Redis failures are raised (the caller serves its fallback) rather
        than answered by a load without L2.
        """
        self._refresh_registry()
        if self.unverifiable:
            self.stats.l2_misses += 1
            value, _ = self._call_loader(loader)
            if value is not NOT_FOUND and value is not None:
                encode(self.serializer, key, value)  # what cannot be cached fails the same way everywhere
            return None if value is NOT_FOUND else value
        tag_list = all_tags(key, tags, self.registry)
        since = self.l1.begin()
        try:
            # Optimistic plain read first (a hit costs no script); the miss then takes its token, a
            # second round trip that the load it precedes dwarfs. A refresh goes straight to the token.
            found = None if refresh_of is not None else self._read(key, tag_list, lease=False)
            if found is None or not found.usable:
                found = self._read(key, tag_list, lease=True)
        except L2Unavailable:
            if has_fallback or refresh_of is not None:
                raise
            return self._load_without_l2(key, loader, opts, tag_list, since)
        if found.usable and (refresh_of is None or found.entry.generation != refresh_of):
            value = self._decode(found, opts)
            if value is not MISSING:
                self.stats.l2_hits += 1
                self._put_from_l2(key, found, value, opts, tag_list, since)
                return None if value is NOT_FOUND else value
        self.stats.l2_misses += 1
        lock: tuple[str, str] | None = None
        if opts.distributed_lock:
            value, lock = self._lock_or_wait(key, tag_list, opts, since)
            if value is not MISSING:
                return value
        try:
            value, delta = self._call_loader(loader)
            return self._store(key, value, opts, found, tag_list, delta, since)
        finally:
            if lock is not None:
                with contextlib.suppress(L2Unavailable):  # it expires on its own
                    self.link.call([("EVALSHA", UNLOCK.sha, 1, lock[0], lock[1])])

    def _call_loader(self, loader: Callable[[], Any]) -> tuple[Any, float]:
        self.stats.loader_calls += 1
        t0 = monotonic()
        try:
            value = loader()
        except Exception:
            self.stats.loader_errors += 1
            raise
        return value, monotonic() - t0

    def _load_without_l2(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: Sequence[str],
                         since: int) -> Any:
        """Redis is unreachable and L1 has nothing: the loader answers, L1 alone keeps it (fenced like any
        insert, dropped by the reset when the backplane reconnects)."""
        value, delta = self._call_loader(loader)
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else encode(self.serializer, key, value)
        value = NOT_FOUND if negative else frozen_or(value, self.serializer, data, self._copy)
        e = make_entry(monotonic(), value, negative, opts, None, tags, len(data), delta,
                       None, self.rng)
        self.l1.put(key, e, since)
        return None if negative else value

    def _store(self, key: str, value: Any, opts: EntryOptions, found: Found, tags: list[str], delta: float,
               since: int) -> Any:
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else encode(self.serializer, key, value)
        value = NOT_FOUND if negative else frozen_or(value, self.serializer, data, self._copy)
        ttl = jittered(opts.negative_ttl if negative else opts.ttl, opts.jitter, self.rng)
        snap = {t: found.current.get(t) or "" for t in tags}
        try:
            gen = fill_result(self.link.call([fill_command(self.keyspace, found.entry, data, negative, snap, ttl)])[0])
        except L2Unavailable:
            gen, ttl_left = None, None  # Redis went away after the token: L1 alone, as in _load_without_l2
        else:
            if gen is None:
                self.stats.fills_refused += 1
                self.l1.remove(key)  # a newer change reached the key while we loaded: keep no copy of ours
                return None if negative else value
            self.stats.fills += 1
            self.stats.negative_fills += negative
            ttl_left = ttl
        e = make_entry(monotonic(), value, negative, opts, ttl_left, tags, len(data),
                       delta, gen, self.rng)
        self.l1.put(key, e, since)
        return None if negative else value

    def _lock_or_wait(self, key: str, tags: list[str], opts: EntryOptions,
                      since: int) -> tuple[Any, tuple[str, str] | None]:
        """Cross-process single flight: the lock holder loads; the others wait for its fill, at most
        ``lock_ttl`` (a holder that died stops blocking when its lock expires)."""
        lock_key = self.keyspace.system(f"lock:{key}")
        token = f"{self.run_id}:{next(_lock_ids)}"
        acquire: list[Command] = [("SET", lock_key, token, "NX", "PX", max(1, int(opts.lock_ttl * 1000)))]
        if self.link.call_checked(acquire)[0]:
            return MISSING, (lock_key, token)
        deadline = monotonic() + opts.lock_ttl
        while monotonic() < deadline:
            time.sleep(self.options.lock_poll)
            found = self._read(key, tags, lease=False)
            if found.usable:
                value = self._decode(found, opts)
                if value is not MISSING:
                    self.stats.coalesced += 1
                    self._put_from_l2(key, found, value, opts, tags, since)
                    return (None if value is NOT_FOUND else value), None
            if self.link.call_checked(acquire)[0]:  # the holder finished without filling, or died
                return MISSING, (lock_key, token)
        return MISSING, None

    # ---------------------------------------------------------------- writes

    def set(self, key: str, value: Any, *, ttl: Duration | None = None, tags: Iterable[str] = (),
            options: EntryOptions | None = None) -> bool:
        """Write-through after the app changed the database. Goes through the guard too: if a change
        reached the key meanwhile (possibly this very write, via the daemon), the newer state wins and
        this process's L1 drops the key. Other processes' L1s drop it via the backplane.

        Returns whether L2 took the value (False: refused by the guard, or Redis unreachable).
        """
        tags = check_names(key, tags)
        opts = (options or self.options.entry).merged(ttl=ttl)
        data = encode(self.serializer, key, value)
        self._refresh_registry()
        if self.unverifiable:
            self.delete(key)  # nothing may be cached, and an older copy must not survive the write
            return False
        tag_list = all_tags(key, tags, self.registry)
        since = self.l1.begin()
        try:
            found = self._read(key, tag_list, lease=True)
            ttl_s = jittered(opts.ttl, opts.jitter, self.rng)
            snap = {t: found.current.get(t) or "" for t in tag_list}
            with self._publish_lock:
                replies = self.link.call([fill_command(self.keyspace, found.entry, data, False, snap, ttl_s),
                                          *self._announce([key], [])])
            gen = fill_result(replies[0])
        except L2Unavailable:
            self.l1.remove(key)
            return False
        if gen is None:
            self.stats.fills_refused += 1
            self.l1.remove(key)
            return False
        self.stats.fills += 1
        stored = frozen_or(value, self.serializer, data, self._copy)
        e = make_entry(monotonic(), stored, False, opts, ttl_s, tag_list, len(data), 0.0, gen, self.rng)
        self.l1.put(key, e, since, fence=True)
        return True

    def delete(self, key: str) -> bool:
        """Invalidate ``key`` everywhere: a tombstone in L2 (fills in flight fail), this L1, other L1s via the
        backplane. Returns False when Redis was unreachable (only this process's L1 dropped it)."""
        check_names(key)
        try:
            with self._publish_lock:
                self.link.call_checked([("EVALSHA", INVALIDATE.sha, 1, self.keyspace.entry(key),
                                         max(1, int(self.options.tombstone_ttl * 1000))),
                                        *self._announce([key], [])])
            return True
        except L2Unavailable:
            return False
        finally:
            self.l1.remove(key)  # after Redis: a read racing the write cannot re-insert the old value

    def invalidate_tag(self, tag: str) -> bool:
        """O(1): bump the tag's counter; every entry that recorded the old value misses, everywhere.
        Returns False when Redis was unreachable (only this process's L1 dropped them)."""
        check_name(tag, "tag")
        try:
            with self._publish_lock:
                self.link.call_checked([("EVALSHA", BUMP.sha, 1, self.keyspace.tag(tag)), *self._announce([], [tag])])
            return True
        except L2Unavailable:
            return False
        finally:
            self.l1.remove_tags([tag])

    def _announce(self, keys: Sequence[str], tags: Sequence[str]) -> list[Command]:
        """PUBLISH commands for this process's change (call with the publish lock held: numbers in order)."""
        if not self.options.publish:
            return []
        msgs = list(self.sequencer.messages([self.keyspace.entry(k) for k in keys], tags, "", time.time()))
        self.stats.published += len(msgs)
        return [("PUBLISH", self.keyspace.channel, m.encode()) for m in msgs]

    # ---------------------------------------------------------------- decorator

    @staticmethod
    def key(template: str, /, **values: Any) -> str | None:
        """``Cache.key("pair:{a}:{b}", a="x:y", b="z")`` -> ``pair:x%3Ay:z``: the key the daemon writes for a
        row with these column values (same rendering and escaping), or None when a value is None or empty."""
        return render(template, values)

    def cached(self, key: str, tags: Sequence[str] = (), ttl: Duration | None = None,
               options: EntryOptions | None = None, decode: Callable[[Any], Any] | None = None,
               exists_filter: str | None = None) -> Callable[[Callable[P, T]], CachedFunction[P, T]]:
        """``@cache.cached(key="user:{user_id}", tags=["tenant:{tenant_id}"], ttl=60)`` on a sync function.

        Templates are filled from the function's arguments by name (defaults included). The wrapper
        has ``.key(*args, **kwargs)`` and ``.invalidate(*args, **kwargs)``. For ``async def``
        functions use :meth:`AsyncCache.cached`.
        """

        def deco(fn: Callable[P, T]) -> CachedFunction[P, T]:
            import inspect

            if inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is async: decorate it with an AsyncCache")
            tpl = KeyTemplate(fn, key, tags)

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                k, t = tpl.render(args, kwargs)
                if k is None:  # a None/empty key argument: no such key (the daemon writes none), not cached
                    return fn(*args, **kwargs)
                return self.get_or_load(k, lambda: fn(*args, **kwargs), ttl=ttl, tags=t, options=options,
                                        decode=decode, exists_filter=exists_filter)

            def invalidate(*a: P.args, **kw: P.kwargs) -> bool:
                k = tpl.render(a, kw)[0]
                return self.delete(k) if k is not None else False

            def key_of(*a: P.args, **kw: P.kwargs) -> str | None:
                return tpl.render(a, kw)[0]

            out = cast("CachedFunction[P, T]", wrapper)
            out.key = key_of  # type: ignore[method-assign]
            out.invalidate = invalidate  # type: ignore[method-assign]
            return out

        return deco

    # ---------------------------------------------------------------- backplane (called by the listener)

    def apply_message(self, msg: Message) -> None:
        """Drop what a backplane message names: its keys and every entry carrying one of its tags; then
        (never before) let read-your-writes waiters see the watermark it carries."""
        prefix = self.keyspace.prefix
        n = len(prefix)
        if msg.keys:
            self.l1.remove_many([k[n:] for k in msg.keys if k.startswith(prefix)])
        if msg.tags:
            self.l1.remove_tags(msg.tags)
            if any(Keyspace.is_table_tag(t) for t in msg.tags):
                self._registry_at = -math.inf  # a truncate is a good moment to re-read the rules
        if msg.watermark:
            self.watermark.observe(msg.watermark)

    # ---------------------------------------------------------------- read-your-writes

    @staticmethod
    def read_your_writes(position: Position | None) -> contextlib.AbstractContextManager[int]:
        """``with cache.read_your_writes(pos):`` every read in the scope (this thread) is at least as new
        as the commit at ``pos`` (see :func:`cdcd.client.commit_position`)."""
        return read_your_writes(position)

    def wait_applied(self, position: Position, timeout: float | None = None) -> bool:
        """Wait until the daemon applied every commit up to ``position`` (and announced it, so this
        process's L1 dropped what it changed); False after ``timeout`` (default ``ryw_timeout``)."""
        pos = parse_position(position)
        return self._await_position(pos, self.options.ryw_timeout if timeout is None else timeout) is not None

    def _read_your_writes(self, key: str, min_position: Position | None) -> bool:
        """True: read on (L1 dropped for ``key`` when only Redis vouched for the position). False: bypass."""
        pos = max(parse_position(min_position) if min_position is not None else 0, ambient_position())
        if not pos or self.watermark.value >= pos:
            return True
        self.stats.ryw_waits += 1
        timeout = self.options.ryw_timeout
        how = self._await_position(pos, timeout)
        if how is None:
            self.stats.ryw_timeouts += 1
            if self.options.ryw_on_timeout == "raise":
                raise NotApplied(pos, self.watermark.value, timeout)
            return False
        if how == "redis":
            self.l1.remove(key)  # the backplane has not caught up: this L1 may still hold the old value
        return True

    def _await_position(self, pos: int, timeout: float) -> Satisfied:
        """The backplane first (no Redis traffic in the common case); Redis's applied state when it is
        slow or not subscribed."""
        deadline = monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - monotonic())
            listening = self._subscriber is not None and self._subscriber.connected.is_set()
            if listening and self.watermark.wait(pos, min(remaining, REDIS_CHECK_EVERY)):
                return "backplane"
            try:
                w = self.link.call_checked([("HGET", self.keyspace.applied, "watermark")])[0]
            except L2Unavailable:
                w = None
            if w and int(w) >= pos:
                return "redis"
            if monotonic() >= deadline:
                return None
            if not listening:
                time.sleep(min(REDIS_CHECK_EVERY, max(0.0, deadline - monotonic())))

    def reset_l1(self, why: str) -> None:
        """The backplane may have lost messages: nothing in L1 can be trusted to be current."""
        self.stats.l1_resets += 1
        self.l1.expire_all()
        self._registry_at = -math.inf
        log.debug("l1_reset", reason=why)

    def redis_reachable(self) -> bool:
        try:
            self.link.call_checked([("PING",)])
            return True
        except L2Unavailable:
            return False
