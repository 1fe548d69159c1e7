"""The asyncio cache: the asyncio driver of :mod:`.core`, with the same semantics as
:class:`cdcd.client.Cache` over ``redis.asyncio``.

The flow is :class:`~.core.CacheCore`'s, step for step; this module only does the I/O
(:class:`~.link.AsyncLink`) and what only asyncio can: a load runs as a task of its own, so a caller
that is cancelled or times out never cancels the load the other callers (and the cache) are waiting
for.

Loaders are ``async def`` functions or plain callables; a plain callable runs inline on the event
loop, so give it nothing that blocks (wrap blocking I/O with ``asyncio.to_thread``).

One ``AsyncCache`` belongs to one event loop (its connections do). Create it inside the loop:
``cache = await AsyncCache.create(url, options)`` or ``async with AsyncCache(url, options) as cache``;
the backplane listener starts on first use otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import monotonic
from typing import Any, ParamSpec, TypeVar, overload

import redis.asyncio as aredis

from ._log import log
from .cluster_link import AsyncClusterLink
from .connect import make_async_link, open_async_client
from .consistency import ACTIVE, Position
from .core import MISS, SERVE_AND_REFRESH, out
from .decorated import AsyncCachedFunction
from .link import AsyncLink
from .options import CacheOptions, Duration, EntryOptions
from .protocol import KeyTemplate
from .serializers import Serializer
from .steps import JOIN, LOAD, PUBLISH, REFRESH, SLEEP, WAIT_APPLIED, FlightTimedOut, Step, arun
from .subscriber import AsyncSubscriber
from .surface import CacheSurface, decorated
from .values import thaw

Loader = Callable[[], Any]
T = TypeVar("T")
P = ParamSpec("P")


class AsyncCache(CacheSurface):
    """One per process and event loop. See :class:`cdcd.client.Cache` for the semantics."""

    link: AsyncLink | AsyncClusterLink

    def __init__(self, client: aredis.Redis | aredis.RedisCluster | str = "redis://127.0.0.1:6379/0",
                 options: CacheOptions | None = None,
                 serializer: Serializer | None = None, rng: random.Random | None = None) -> None:
        super().__init__(client, options, serializer, rng, open_async_client, make_async_link)
        self._hot_task: asyncio.Task[None] | None = None  # the hot-key publisher, started by start()
        self._flights: dict[str, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publish_lock: asyncio.Lock | None = None
        self._subscriber = AsyncSubscriber(self.core, self.link) if self.options.subscribe else None
        self.connected = self._subscriber.connected if self._subscriber is not None else asyncio.Event()

    def _bind_copies(self) -> None:
        self.get = self._get_copy  # type: ignore[method-assign]
        self.get_or_load = self._get_or_load_copy  # type: ignore[method-assign]

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

    async def redis_reachable(self) -> bool:
        return bool(await arun(self.core.reachable(), self._do, self.link))

    # ---------------------------------------------------------------- the driver

    async def _do(self, step: Step) -> Any:
        """One step of a core flow (flows run with :func:`.steps.arun`; a cancellation is raised in the
        flow too, so its ``finally``, an unlock, still runs)."""
        kind = step[0]
        if kind is LOAD:
            value = step[1]()
            if inspect.isawaitable(value):  # plain callables are loaders too
                value = await value
            return value
        if kind is JOIN:
            return await self._join(*step[1:])
        if kind is PUBLISH:
            _, cmds, keys, tags, checked = step
            async with self._lock():  # numbers reach Redis in order
                cmds = [*cmds, *self.core.announce(keys, tags)]
                return await (self.link.call_checked(cmds) if checked else self.link.call(cmds))
        if kind is REFRESH:
            _, key, loader, opts, tags, refresh_of = step
            return self._background(key, loader, None, tags, opts, refresh_of)
        if kind is SLEEP:
            return await asyncio.sleep(step[1])
        if kind is WAIT_APPLIED:
            if self._subscriber is None or not self.connected.is_set():
                return None
            return await self.watermark.wait_async(step[1], step[2])
        raise TypeError(f"unknown step {step!r}")

    def _lock(self) -> asyncio.Lock:
        if self._publish_lock is None:
            self._publish_lock = asyncio.Lock()
        return self._publish_lock

    # ---------------------------------------------------------------- reads

    async def get(self, key: str, default: Any = None, *, decode: Callable[[Any], Any] | None = None,
                  min_position: Position | None = None) -> Any:
        """See :meth:`cdcd.client.Cache.get`."""
        if (min_position is not None or ACTIVE[0]) and not await self._ryw(key, min_position):
            return default
        e = self._l1data.get(key)
        if e is not None and monotonic() < e.hard:
            e.ref = True
            self.stats.l1_hits += 1
            return default if e.negative else e.value
        self._ensure_started()
        return await arun(self.core.get(key, default, decode), self._do, self.link)

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
        if (min_position is not None or ACTIVE[0]) and not await self._ryw(key, min_position):
            return await arun(self.core.bypass(loader), self._do, self.link)
        e = self._l1data.get(key)
        if e is not None:
            now = monotonic()
            if now < e.early:  # fresh, and far from expiry: the common case, kept lean
                e.ref = True
                self.stats.l1_hits += 1
                return None if e.negative else e.value
            how = self.core.late_hit(e, now, options)
            if how != MISS:
                if how == SERVE_AND_REFRESH:
                    self._background(key, loader, ttl, tags, options, e.generation, decode)
                return out(e)
        self._ensure_started()
        return await arun(self.core.get_or_load(key, loader, ttl, tags, options, decode, exists_filter), self._do,
                          self.link)

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

    # ---------------------------------------------------------------- single flight (tasks)

    async def _join(self, key: str, loader: Loader, opts: EntryOptions, tags: list[str], has_fallback: bool,
                    timeout: float | None) -> tuple[bool, Any]:
        """A ``JOIN`` step (see :mod:`.steps`): the load is a task of its own, shielded from its waiters."""
        task = self._flights.get(key)
        leader = task is None
        if task is None:
            task = self._start_flight(key, loader, opts, tags, None, has_fallback)
        else:
            self.stats.coalesced += 1
        try:
            return leader, await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            if task.done():  # the loader itself raised TimeoutError: an error like any other
                raise
            raise FlightTimedOut(timeout) from None

    def _start_flight(self, key: str, loader: Loader, opts: EntryOptions, tags: list[str], refresh_of: str | None,
                      has_fallback: bool) -> asyncio.Task[Any]:
        flow = self.core.load(key, loader, opts, tags, refresh_of, has_fallback)
        task = asyncio.get_running_loop().create_task(arun(flow, self._do, self.link))
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
        """One background refresh per key: nothing starts while a load or refresh of it is in flight."""
        if key in self._flights:
            return
        self.stats.refreshes += 1
        self._start_flight(key, loader, (options or self.options.entry).merged(ttl=ttl, decode=decode), list(tags),
                           refresh_of or "", False)

    # ---------------------------------------------------------------- writes

    async def set(self, key: str, value: Any, *, ttl: Duration | None = None, tags: Iterable[str] = (),
                  options: EntryOptions | None = None) -> bool:
        """See :meth:`cdcd.client.Cache.set`."""
        return bool(await arun(self.core.set(key, value, ttl, tags, options), self._do, self.link))

    async def delete(self, key: str) -> bool:
        """See :meth:`cdcd.client.Cache.delete`."""
        return bool(await arun(self.core.delete(key), self._do, self.link))

    async def invalidate_tag(self, tag: str) -> bool:
        """See :meth:`cdcd.client.Cache.invalidate_tag`."""
        return bool(await arun(self.core.invalidate_tag(tag), self._do, self.link))

    # ---------------------------------------------------------------- decorator

    def cached(self, key: str, tags: Sequence[str] = (), ttl: Duration | None = None,
               options: EntryOptions | None = None,
               decode: Callable[[Any], Any] | None = None, exists_filter: str | None = None
               ) -> Callable[[Callable[P, Awaitable[T]]], AsyncCachedFunction[P, T]]:
        """Decorator for ``async def`` functions; see :meth:`Cache.cached`."""

        def deco(fn: Callable[P, Awaitable[T]]) -> AsyncCachedFunction[P, T]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is not async: decorate it with a (sync) Cache")
            tpl = KeyTemplate(fn, key, tags)

            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                k, t = tpl.render(args, kwargs)
                if k is None:  # a None/empty key argument: no such key (the daemon writes none), not cached
                    return await fn(*args, **kwargs)
                return await self.get_or_load(k, lambda: fn(*args, **kwargs), ttl=ttl, tags=t, options=options,
                                              decode=decode, exists_filter=exists_filter)

            async def invalidate(*a: P.args, **kw: P.kwargs) -> bool:
                k = tpl.render(a, kw)[0]
                return await self.delete(k) if k is not None else False

            return decorated(fn, wrapper, tpl, invalidate)  # type: ignore[no-any-return]

        return deco

    # ---------------------------------------------------------------- read-your-writes

    async def wait_applied(self, position: Position, timeout: float | None = None) -> bool:
        """See :meth:`cdcd.client.Cache.wait_applied`."""
        self._ensure_started()
        return bool(await arun(self.core.wait_applied(position, timeout), self._do, self.link))

    async def _ryw(self, key: str, min_position: Position | None) -> bool:
        self._ensure_started()
        return bool(await arun(self.core.read_your_writes(key, min_position), self._do, self.link))
