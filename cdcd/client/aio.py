"""The asyncio cache: the same semantics as :class:`cdcd.client.Cache` over ``redis.asyncio``.

Shares L1, options, commands, reply parsing, lifetimes and backplane tracking with the sync cache
(:mod:`.protocol`, :mod:`.subscriber`); only the I/O and the concurrency primitives differ. A load
runs as a task of its own, so a caller that is cancelled or times out never cancels the load the
other callers (and the cache) are waiting for.

Loaders are ``async def`` functions or plain callables; a plain callable runs inline on the event
loop, so give it nothing that blocks (wrap blocking I/O with ``asyncio.to_thread``).

One ``AsyncCache`` belongs to one event loop (its connections do). Create it inside the loop:
``cache = await AsyncCache.create(url, options)`` or ``async with AsyncCache(url, options) as cache``;
the backplane listener starts on first use otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import monotonic
from typing import Any, ParamSpec, TypeVar, cast, overload

import redis.asyncio as aredis

from cdcd.backplane import Message, Sequencer
from cdcd.keys import check_name, render
from cdcd.keyspace import Keyspace

from ._log import log
from .breaker import CircuitBreaker
from .connect import make_async_link, open_async_client
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
from .decorated import AsyncCachedFunction
from .existence import ExistenceFilters, aabsent
from .hotkeys import HotKeys
from .l1 import L1, L1Entry
from .link import UNLOCK, Command, L2Unavailable
from .options import CacheOptions, Duration, EntryOptions
from .protocol import (
    BUMP,
    INVALIDATE,
    MISSING,
    NOT_FOUND,
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
from .subscriber import AsyncSubscriber
from .typed import TypedSerializer
from .values import UnencodableValue, decode_entry, encode, frozen_or, thaw

Loader = Callable[[], Any]
T = TypeVar("T")
P = ParamSpec("P")
_lock_ids = itertools.count()


def _out(e: L1Entry) -> Any:
    return None if e.negative else e.value


class AsyncCache:
    """One per process and event loop. See :class:`cdcd.client.Cache` for the semantics."""

    def __init__(self, client: aredis.Redis | aredis.RedisCluster | str = "redis://127.0.0.1:6379/0",
                 options: CacheOptions | None = None,
                 serializer: Serializer | None = None, rng: random.Random | None = None) -> None:
        self.options = opts = options or CacheOptions()
        client = open_async_client(client)  # a URL: redis+cluster:// is a cluster
        self.redis: Any = client
        self.keyspace = Keyspace(opts.prefix, opts.channel)
        self.serializer: Serializer = serializer or TypedSerializer()
        self._copy = opts.l1_copy
        if self._copy:  # every public read hands out its own copy (see values.Frozen)
            self.get = self._get_copy  # type: ignore[method-assign]
            self.get_or_load = self._get_or_load_copy  # type: ignore[method-assign]
        self.stats = Stats()
        self.l1 = L1(opts.l1_max_entries, opts.l1_max_bytes, self.stats)
        self._l1data = self.l1.data
        self.breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_reset)
        self.link: Any = make_async_link(client, opts, self.breaker, self.stats)  # AsyncClusterLink on a cluster
        self.registry = Registry()
        self._registry_at = -math.inf
        self.exists = ExistenceFilters(self.keyspace)  # docs/existence-filter.md
        self.rng = rng or random.Random()
        self._flights: dict[str, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sequencer = Sequencer("app")
        self._publish_lock: asyncio.Lock | None = None
        self.watermark = Watermark()
        self.hot_keys = HotKeys.attach(self, opts.hot_keys)  # opt-in: wraps get/get_or_load (docs/hot-keys.md)
        self._hot_task: asyncio.Task[None] | None = None  # its publisher, started by start()
        self._subscriber = AsyncSubscriber(self) if opts.subscribe else None
        self.connected = self._subscriber.connected if self._subscriber is not None else asyncio.Event()

    @property
    def run_id(self) -> str:
        return self.sequencer.run

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> AsyncCache:
        cache = cls(*args, **kwargs)
        await cache.start()
        return cache

    async def start(self) -> None:
        """Start the backplane listener and wait (briefly) for its first subscription."""
        if self.hot_keys is not None and self._hot_task is None:
            self._hot_task = self.hot_keys.start_task(self.link.call_checked)
            if self._hot_task is not None:
                self._tasks.add(self._hot_task)
        if self._subscriber is not None and self._subscriber.task is None:
            self._subscriber.start()
            with contextlib.suppress(TimeoutError):  # Redis down: the listener keeps trying
                await asyncio.wait_for(self.connected.wait(),
                                       self.options.connect_timeout_s + self.options.redis_timeout)

    async def close(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.stop()
        for t in list(self._tasks) + list(self._flights.values()):
            t.cancel()
        await self.link.close()

    async def __aenter__(self) -> AsyncCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_subscribed(self, timeout: float = 5.0) -> bool:
        if self._subscriber is None:
            return False
        self._ensure_started()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _ensure_started(self) -> None:
        if self._subscriber is not None and self._subscriber.task is None:
            self._subscriber.start()

    # ---------------------------------------------------------------- Redis plumbing

    @property
    def unverifiable(self) -> bool:
        """No registry in Redis (it restarted empty, or no daemon runs): entries cannot be checked against
        their tables' TRUNCATE counters, so every read is a miss and nothing is cached
        (``require_registry=False`` turns this off for uses without a daemon)."""
        return self.options.require_registry and not self.registry.found

    async def _refresh_registry(self) -> None:
        now = monotonic()
        every = self.options.registry_refresh
        if self.unverifiable:
            every = min(every, 1.0)  # Redis lost it: the daemon restores it within a heartbeat
        if now - self._registry_at < every:
            return
        self._registry_at = now
        try:
            self.registry.load((await self.link.call_checked([("GET", self.keyspace.registry)]))[0])
        except (L2Unavailable, ValueError) as exc:
            log.debug("registry_unavailable", error=str(exc))

    async def _read(self, key: str, tags: Sequence[str], lease: bool) -> Found:
        lease_ms = int(self.options.lease_ttl * 1000) if lease else None
        found = parse_found(key, tags, await self.link.call(read_commands(self.keyspace, key, tags, lease_ms)))
        extra = found.missing()
        if extra:
            values = await self.link.call_checked([("GET", self.keyspace.tag(t)) for t in extra])
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

    async def get(self, key: str, default: Any = None, *, decode: Callable[[Any], Any] | None = None,
                  min_position: Position | None = None) -> Any:
        if (min_position is not None or ACTIVE[0]) and not await self._read_your_writes(key, min_position):
            return default
        e = self._l1data.get(key)
        if e is not None and monotonic() < e.hard:
            e.ref = True
            self.stats.l1_hits += 1
            return default if e.negative else e.value
        self.stats.l1_misses += 1
        check_names(key)
        self._ensure_started()
        opts = self.options.entry if decode is None else self.options.entry.merged(decode=decode)
        since = self.l1.begin()
        try:
            await self._refresh_registry()
            if self.unverifiable:
                self.stats.l2_misses += 1
                return default
            found = await self._read(key, all_tags(key, (), self.registry), lease=False)
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

    @overload
    async def get_or_load(self, key: str, loader: Callable[[], Awaitable[T]], *, ttl: Duration | None = None,
                          tags: Iterable[str] = (), options: EntryOptions | None = None,
                          decode: Callable[[Any], Any] | None = None, min_position: Position | None = None,
                          exists_filter: str | None = None) -> T: ...

    @overload
    async def get_or_load(self, key: str, loader: Callable[[], T], *, ttl: Duration | None = None,
                          tags: Iterable[str] = (), options: EntryOptions | None = None,
                          decode: Callable[[Any], Any] | None = None, min_position: Position | None = None,
                          exists_filter: str | None = None) -> T: ...

    async def get_or_load(self, key: str, loader: Loader, *, ttl: Duration | None = None, tags: Iterable[str] = (),
                          options: EntryOptions | None = None, decode: Callable[[Any], Any] | None = None,
                          min_position: Position | None = None, exists_filter: str | None = None) -> Any:
        """The value of ``key``, loading it with ``loader()`` (an ``async def`` function or a plain callable) on
        a miss; see :meth:`Cache.get_or_load`. A loader returning ``T`` or an awaitable of ``T`` gives ``T``."""
        if (min_position is not None or ACTIVE[0]) and not await self._read_your_writes(key, min_position):
            value = loader()
            if inspect.isawaitable(value):  # plain callables are loaders too
                value = await value
            return None if value is NOT_FOUND else value
        e = self._l1data.get(key)
        if e is not None:
            now = monotonic()
            if now < e.early:
                e.ref = True
                self.stats.l1_hits += 1
                return None if e.negative else e.value
            if now < e.soft:
                e.ref = True
                self.stats.l1_hits += 1
                beta = (options or self.options.entry).early_refresh_beta
                if beta and e.delta and xfetch_due(e.delta, beta, e.soft - now, self.rng.random()):
                    self.stats.early_refreshes += 1
                    self._background(key, loader, ttl, tags, options, e.generation, decode)
                return _out(e)
            if now < e.hard:
                self.stats.stale_served += 1
                self._background(key, loader, ttl, tags, options, e.generation, decode)
                return _out(e)
        self.stats.l1_misses += 1
        if exists_filter is not None and await aabsent(self.exists, self.link.call, self.stats, exists_filter, key):
            return None  # the table's existence filter: no such row (docs/existence-filter.md)
        self._ensure_started()
        result = await self._miss(key, loader, (options or self.options.entry).merged(ttl=ttl, decode=decode),
                                     check_names(key, tags))
        return result

    async def _get_copy(self, key: str, default: Any = None, *, decode: Callable[[Any], Any] | None = None,
                        min_position: Position | None = None) -> Any:
        """``get`` with ``l1_copy``: the caller's own copy (bound over ``get`` at construction)."""
        return thaw(await AsyncCache.get(self, key, default, decode=decode, min_position=min_position))

    async def _get_or_load_copy(self, key: str, loader: Loader, *, ttl: Duration | None = None,
                                tags: Iterable[str] = (), options: EntryOptions | None = None,
                                decode: Callable[[Any], Any] | None = None,
                                min_position: Position | None = None, exists_filter: str | None = None) -> Any:
        """``get_or_load`` with ``l1_copy``: the caller's own copy (bound over ``get_or_load`` at construction)."""
        return thaw(await AsyncCache.get_or_load(
            self, key, loader, ttl=ttl, tags=tags, options=options, decode=decode, min_position=min_position,
            exists_filter=exists_filter))

    # ---------------------------------------------------------------- miss path

    def _fallback(self, key: str, opts: EntryOptions) -> L1Entry | None:
        if not opts.fail_safe:
            return None
        e = self._l1data.get(key)
        return e if e is not None and monotonic() < e.keep else None

    def _serve_fallback(self, key: str, e: L1Entry, opts: EntryOptions) -> Any:
        self.stats.fail_safe += 1
        until = min(monotonic() + opts.fail_safe_throttle, e.keep)
        if until > e.hard:
            self.l1.replace(key, e, L1Entry(e.value, until, until, e.keep, e.tags, e.size, e.negative, e.delta,
                                            e.generation))
        return _out(e)

    async def _miss(self, key: str, loader: Loader, opts: EntryOptions, tags: list[str]) -> Any:
        fallback = self._fallback(key, opts)
        if fallback is not None and self.breaker.state == "open":
            return self._serve_fallback(key, fallback, opts)
        task = self._flights.get(key)
        leader = task is None
        if task is None:
            task = self._start_flight(key, loader, opts, tags, None, fallback is not None)
        else:
            self.stats.coalesced += 1
        timeout = opts.loader_hard_timeout
        if fallback is not None and opts.loader_soft_timeout is not None:
            timeout = opts.loader_soft_timeout
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            cur = self._fallback(key, opts)
            if task.done():  # the loader itself raised TimeoutError: an error like any other
                if cur is not None:
                    return self._serve_fallback(key, cur, opts)
                raise
            self.stats.loader_timeouts += 1  # the flight goes on and still fills the cache
            if cur is not None:
                return self._serve_fallback(key, cur, opts)
            raise TimeoutError(f"loader for {key!r} took longer than {timeout}s") from None
        except UnencodableValue:
            raise  # a programming error: no fallback hides it
        except L2Unavailable:
            cur = self._fallback(key, opts)
            if cur is not None:
                return self._serve_fallback(key, cur, opts)
            return await self._load_without_l2(key, loader, opts, tags, self.l1.begin())
        except asyncio.CancelledError:
            raise
        except Exception:
            cur = self._fallback(key, opts)
            if cur is not None:
                return self._serve_fallback(key, cur, opts)
            raise
        if leader:
            e = self._l1data.get(key)
            if e is not None and e.soft <= monotonic() < e.hard:
                self._background(key, loader, None, tags, opts, e.generation)
        return result

    def _start_flight(self, key: str, loader: Loader, opts: EntryOptions, tags: list[str], refresh_of: str | None,
                      has_fallback: bool) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(self._load(key, loader, opts, tags, refresh_of, has_fallback))
        self._flights[key] = task

        def landed(t: asyncio.Task[Any]) -> None:
            if self._flights.get(key) is t:
                del self._flights[key]
            if not t.cancelled() and t.exception() is not None and refresh_of is not None:
                log.debug("background_refresh_failed", key=key, error=str(t.exception()))

        task.add_done_callback(landed)
        return task

    def _background(self, key: str, loader: Loader, ttl: Duration | None, tags: Iterable[str],
                    options: EntryOptions | None, refresh_of: str | None,
                    decode: Callable[[Any], Any] | None = None) -> None:
        if key in self._flights:
            return
        self.stats.refreshes += 1
        self._start_flight(key, loader, (options or self.options.entry).merged(ttl=ttl, decode=decode), list(tags),
                           refresh_of or "", False)

    async def _load(self, key: str, loader: Loader, opts: EntryOptions, tags: list[str], refresh_of: str | None,
                    has_fallback: bool) -> Any:
        await self._refresh_registry()
        if self.unverifiable:
            self.stats.l2_misses += 1
            value, _ = await self._call_loader(loader)
            if value is not NOT_FOUND and value is not None:
                encode(self.serializer, key, value)  # what cannot be cached fails the same way everywhere
            return None if value is NOT_FOUND else value
        tag_list = all_tags(key, tags, self.registry)
        since = self.l1.begin()
        try:
            # Optimistic plain read first (a hit costs no script); the miss then takes its token, a
            # second round trip that the load it precedes dwarfs. A refresh goes straight to the token.
            found = None if refresh_of is not None else await self._read(key, tag_list, lease=False)
            if found is None or not found.usable:
                found = await self._read(key, tag_list, lease=True)
        except L2Unavailable:
            if has_fallback or refresh_of is not None:
                raise
            return await self._load_without_l2(key, loader, opts, tag_list, since)
        if found.usable and (refresh_of is None or found.entry.generation != refresh_of):
            value = self._decode(found, opts)
            if value is not MISSING:
                self.stats.l2_hits += 1
                self._put_from_l2(key, found, value, opts, tag_list, since)
                return None if value is NOT_FOUND else value
        self.stats.l2_misses += 1
        lock: tuple[str, str] | None = None
        if opts.distributed_lock:
            value, lock = await self._lock_or_wait(key, tag_list, opts, since)
            if value is not MISSING:
                return value
        try:
            value, delta = await self._call_loader(loader)
            return await self._store(key, value, opts, found, tag_list, delta, since)
        finally:
            if lock is not None:
                with contextlib.suppress(L2Unavailable):  # it expires on its own
                    await self.link.call([("EVALSHA", UNLOCK.sha, 1, lock[0], lock[1])])

    async def _call_loader(self, loader: Loader) -> tuple[Any, float]:
        self.stats.loader_calls += 1
        t0 = monotonic()
        try:
            value = loader()
            if inspect.isawaitable(value):
                value = await value
        except Exception:
            self.stats.loader_errors += 1
            raise
        return value, monotonic() - t0

    async def _load_without_l2(self, key: str, loader: Loader, opts: EntryOptions, tags: Sequence[str],
                               since: int) -> Any:
        value, delta = await self._call_loader(loader)
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else encode(self.serializer, key, value)
        value = NOT_FOUND if negative else frozen_or(value, self.serializer, data, self._copy)
        e = make_entry(monotonic(), value, negative, opts, None, tags, len(data), delta,
                       None, self.rng)
        self.l1.put(key, e, since)
        return None if negative else value

    async def _store(self, key: str, value: Any, opts: EntryOptions, found: Found, tags: list[str], delta: float,
                     since: int) -> Any:
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else encode(self.serializer, key, value)
        value = NOT_FOUND if negative else frozen_or(value, self.serializer, data, self._copy)
        ttl = jittered(opts.negative_ttl if negative else opts.ttl, opts.jitter, self.rng)
        snap = {t: found.current.get(t) or "" for t in tags}
        ttl_left: float | None
        try:
            reply = (await self.link.call([fill_command(self.keyspace, found.entry, data, negative, snap, ttl)]))[0]
            gen = fill_result(reply)
        except L2Unavailable:
            gen, ttl_left = None, None
        else:
            if gen is None:
                self.stats.fills_refused += 1
                self.l1.remove(key)
                return None if negative else value
            self.stats.fills += 1
            self.stats.negative_fills += negative
            ttl_left = ttl
        e = make_entry(monotonic(), value, negative, opts, ttl_left, tags, len(data),
                       delta, gen, self.rng)
        self.l1.put(key, e, since)
        return None if negative else value

    async def _lock_or_wait(self, key: str, tags: list[str], opts: EntryOptions,
                            since: int) -> tuple[Any, tuple[str, str] | None]:
        lock_key = self.keyspace.system(f"lock:{key}")
        token = f"{self.run_id}:{next(_lock_ids)}"
        acquire: list[Command] = [("SET", lock_key, token, "NX", "PX", max(1, int(opts.lock_ttl * 1000)))]
        if (await self.link.call_checked(acquire))[0]:
            return MISSING, (lock_key, token)
        deadline = monotonic() + opts.lock_ttl
        while monotonic() < deadline:
            await asyncio.sleep(self.options.lock_poll)
            found = await self._read(key, tags, lease=False)
            if found.usable:
                value = self._decode(found, opts)
                if value is not MISSING:
                    self.stats.coalesced += 1
                    self._put_from_l2(key, found, value, opts, tags, since)
                    return (None if value is NOT_FOUND else value), None
            if (await self.link.call_checked(acquire))[0]:
                return MISSING, (lock_key, token)
        return MISSING, None

    # ---------------------------------------------------------------- writes

    def _lock(self) -> asyncio.Lock:
        if self._publish_lock is None:
            self._publish_lock = asyncio.Lock()
        return self._publish_lock

    async def set(self, key: str, value: Any, *, ttl: Duration | None = None, tags: Iterable[str] = (),
                  options: EntryOptions | None = None) -> bool:
        tags = check_names(key, tags)
        opts = (options or self.options.entry).merged(ttl=ttl)
        data = encode(self.serializer, key, value)
        await self._refresh_registry()
        if self.unverifiable:
            await self.delete(key)  # nothing may be cached, and an older copy must not survive the write
            return False
        tag_list = all_tags(key, tags, self.registry)
        since = self.l1.begin()
        try:
            found = await self._read(key, tag_list, lease=True)
            ttl_s = jittered(opts.ttl, opts.jitter, self.rng)
            snap = {t: found.current.get(t) or "" for t in tag_list}
            async with self._lock():
                replies = await self.link.call([fill_command(self.keyspace, found.entry, data, False, snap, ttl_s),
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

    async def delete(self, key: str) -> bool:
        check_names(key)
        try:
            async with self._lock():
                await self.link.call_checked([("EVALSHA", INVALIDATE.sha, 1, self.keyspace.entry(key),
                                               max(1, int(self.options.tombstone_ttl * 1000))),
                                              *self._announce([key], [])])
            return True
        except L2Unavailable:
            return False
        finally:
            self.l1.remove(key)

    async def invalidate_tag(self, tag: str) -> bool:
        check_name(tag, "tag")
        try:
            async with self._lock():
                await self.link.call_checked([("EVALSHA", BUMP.sha, 1, self.keyspace.tag(tag)),
                                              *self._announce([], [tag])])
            return True
        except L2Unavailable:
            return False
        finally:
            self.l1.remove_tags([tag])

    def _announce(self, keys: Sequence[str], tags: Sequence[str]) -> list[Command]:
        if not self.options.publish:
            return []
        msgs = list(self.sequencer.messages([self.keyspace.entry(k) for k in keys], tags, "", time.time()))
        self.stats.published += len(msgs)
        return [("PUBLISH", self.keyspace.channel, m.encode()) for m in msgs]

    # ---------------------------------------------------------------- decorator

    @staticmethod
    def key(template: str, /, **values: Any) -> str | None:
        """The key the daemon writes for these column values; see :meth:`Cache.key`."""
        return render(template, values)

    def cached(self, key: str, tags: Sequence[str] = (), ttl: Duration | None = None,
               options: EntryOptions | None = None,
               decode: Callable[[Any], Any] | None = None, exists_filter: str | None = None
               ) -> Callable[[Callable[P, Awaitable[T]]], AsyncCachedFunction[P, T]]:
        """Decorator for ``async def`` functions; see :meth:`Cache.cached`."""

        def deco(fn: Callable[P, Awaitable[T]]) -> AsyncCachedFunction[P, T]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is not async: decorate it with a (sync) Cache")
            tpl = KeyTemplate(fn, key, tags)

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                k, t = tpl.render(args, kwargs)
                if k is None:  # a None/empty key argument: no such key (the daemon writes none), not cached
                    return await fn(*args, **kwargs)
                return await self.get_or_load(k, lambda: fn(*args, **kwargs), ttl=ttl, tags=t, options=options,
                                              decode=decode, exists_filter=exists_filter)

            async def invalidate(*a: P.args, **kw: P.kwargs) -> bool:
                k = tpl.render(a, kw)[0]
                return await self.delete(k) if k is not None else False

            def key_of(*a: P.args, **kw: P.kwargs) -> str | None:
                return tpl.render(a, kw)[0]

            out = cast("AsyncCachedFunction[P, T]", wrapper)
            out.key = key_of  # type: ignore[method-assign]
            out.invalidate = invalidate  # type: ignore[method-assign]
            return out

        return deco

    # ---------------------------------------------------------------- backplane (called by the listener)

    def apply_message(self, msg: Message) -> None:
        prefix = self.keyspace.prefix
        n = len(prefix)
        if msg.keys:
            self.l1.remove_many([k[n:] for k in msg.keys if k.startswith(prefix)])
        if msg.tags:
            self.l1.remove_tags(msg.tags)
            if any(Keyspace.is_table_tag(t) for t in msg.tags):
                self._registry_at = -math.inf
        if msg.watermark:
            self.watermark.observe(msg.watermark)

    # ---------------------------------------------------------------- read-your-writes

    @staticmethod
    def read_your_writes(position: Position | None) -> contextlib.AbstractContextManager[int]:
        """``with cache.read_your_writes(pos):`` every read in the scope (this task and the tasks it starts)
        is at least as new as the commit at ``pos``; see :meth:`cdcd.client.Cache.read_your_writes`."""
        return read_your_writes(position)

    async def wait_applied(self, position: Position, timeout: float | None = None) -> bool:
        """See :meth:`cdcd.client.Cache.wait_applied`."""
        pos = parse_position(position)
        return await self._await_position(pos, self.options.ryw_timeout if timeout is None else timeout) is not None

    async def _read_your_writes(self, key: str, min_position: Position | None) -> bool:
        pos = max(parse_position(min_position) if min_position is not None else 0, ambient_position())
        if not pos or self.watermark.value >= pos:
            return True
        self.stats.ryw_waits += 1
        timeout = self.options.ryw_timeout
        how = await self._await_position(pos, timeout)
        if how is None:
            self.stats.ryw_timeouts += 1
            if self.options.ryw_on_timeout == "raise":
                raise NotApplied(pos, self.watermark.value, timeout)
            return False
        if how == "redis":
            self.l1.remove(key)  # the backplane has not caught up: this L1 may still hold the old value
        return True

    async def _await_position(self, pos: int, timeout: float) -> Satisfied:
        self._ensure_started()
        deadline = monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - monotonic())
            listening = self._subscriber is not None and self.connected.is_set()
            if listening and await self.watermark.wait_async(pos, min(remaining, REDIS_CHECK_EVERY)):
                return "backplane"
            try:
                w = (await self.link.call_checked([("HGET", self.keyspace.applied, "watermark")]))[0]
            except L2Unavailable:
                w = None
            if w and int(w) >= pos:
                return "redis"
            if monotonic() >= deadline:
                return None
            if not listening:
                await asyncio.sleep(min(REDIS_CHECK_EVERY, max(0.0, deadline - monotonic())))

    def reset_l1(self, why: str) -> None:
        self.stats.l1_resets += 1
        self.l1.expire_all()
        self._registry_at = -math.inf
        log.debug("l1_reset", reason=why)

    async def redis_reachable(self) -> bool:
        try:
            await self.link.call_checked([("PING",)])
            return True
        except L2Unavailable:
            return False
