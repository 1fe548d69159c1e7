"""The sync cache: the thread driver of :mod:`.core` (L1 in process, L2 in Redis, kept honest by the
daemon's versions and backplane).

The flow (L2 reads, fills through the guard, SWR, XFetch, fail-safe, negative entries, tags,
read-your-writes) is written once in :class:`~.core.CacheCore` as generators; this module runs them
with blocking Redis calls (:class:`~.link.Link`) and does what only threads can: single flight with
a lock and events, background refreshes on a thread pool, the publish lock. The L1 fresh hit stays a
plain fast path here, with no generator.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from time import monotonic
from typing import Any, ParamSpec, TypeVar

import redis

from ._log import log
from .cluster_link import ClusterLink
from .connect import make_link, open_client
from .consistency import ACTIVE, Position
from .core import MISS, SERVE_AND_REFRESH, out
from .decorated import CachedFunction
from .link import L2Unavailable, Link
from .options import CacheOptions, Duration, EntryOptions
from .protocol import XFETCH_HORIZON, KeyTemplate
from .serializers import Serializer
from .steps import JOIN, LOAD, PUBLISH, REFRESH, SLEEP, WAIT_APPLIED, FlightTimedOut, Step, run
from .subscriber import Subscriber
from .surface import CacheSurface, decorated
from .values import thaw

__all__ = ["XFETCH_HORIZON", "Cache", "L2Unavailable"]

T = TypeVar("T")
P = ParamSpec("P")


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


class Cache(CacheSurface):
    """Thread-safe; create one per process and share it.

    ``client`` is a URL (``redis+cluster://`` for a Redis Cluster: docs/redis-cluster.md) or a
    ``redis.Redis`` / ``redis.RedisCluster`` whose settings (hosts, TLS, auth, db) are used for the cache's
    own connections, with the cache's timeouts and no retries (see :mod:`.link`).
    """

    link: Link | ClusterLink

    def __init__(self, client: redis.Redis | redis.RedisCluster | str = "redis://127.0.0.1:6379/0",
                 options: CacheOptions | None = None,
                 serializer: Serializer | None = None, rng: random.Random | None = None) -> None:
        super().__init__(client, options, serializer, rng, open_client, make_link)
        if self.hot_keys is not None:
            self.hot_keys.start_thread(self.link.call_checked)
        self._flights: dict[str, _Flight] = {}
        self._flight_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.options.background_workers,
                                                           thread_name_prefix="cdcd-cache")
        self._publish_lock = threading.Lock()
        self._subscriber: Subscriber | None = None
        if self.options.subscribe:
            self._subscriber = Subscriber(self.core, self.link)
            self._subscriber.start()
            # The first subscription resets L1; waiting for it (briefly) keeps early entries.
            self._subscriber.connected.wait(self.options.connect_timeout_s + self.options.redis_timeout)

    def _bind_copies(self) -> None:
        self.get = self._get_copy  # type: ignore[method-assign]
        self.get_or_load = self._get_or_load_copy  # type: ignore[method-assign]

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

    def redis_reachable(self) -> bool:
        return bool(run(self.core.reachable(), self._do, self.link))

    # ---------------------------------------------------------------- the driver

    def _do(self, step: Step) -> Any:
        """One step of a core flow (flows run with :func:`.steps.run`)."""
        kind = step[0]
        if kind is JOIN:
            return self._join(*step[1:])
        if kind is LOAD:
            return step[1]()
        if kind is PUBLISH:
            _, cmds, keys, tags, checked = step
            with self._publish_lock:  # numbers reach Redis in order
                cmds = [*cmds, *self.core.announce(keys, tags)]
                return self.link.call_checked(cmds) if checked else self.link.call(cmds)
        if kind is REFRESH:
            _, key, loader, opts, tags, refresh_of = step
            return self._background(key, loader, None, tags, opts, refresh_of)
        if kind is SLEEP:
            return time.sleep(step[1])
        if kind is WAIT_APPLIED:
            sub = self._subscriber
            if sub is None or not sub.connected.is_set():
                return None
            return self.watermark.wait(step[1], step[2])
        raise TypeError(f"unknown step {step!r}")

    # ---------------------------------------------------------------- reads

    def get(self, key: str, default: Any = None, *, decode: Callable[[Any], Any] | None = None,
            min_position: Position | None = None) -> Any:
        """L1, then L2; never calls a loader. A cached "not found" returns ``default``. ``decode``: see
        :attr:`EntryOptions.decode`.

        ``min_position`` (or a :meth:`read_your_writes` scope): nothing older than that commit; when the
        daemon has not applied it within ``ryw_timeout``, ``default`` (a miss) or ``NotApplied``."""
        if (min_position is not None or ACTIVE[0]) and not self._ryw(key, min_position):
            return default
        e = self._l1data.get(key)
        if e is not None and monotonic() < e.hard:
            e.ref = True
            self.stats.l1_hits += 1
            return default if e.negative else e.value
        return run(self.core.get(key, default, decode), self._do, self.link)

    def get_or_load(self, key: str, loader: Callable[[], T], *, ttl: Duration | None = None,
                    tags: Iterable[str] = (), options: EntryOptions | None = None,
                    decode: Callable[[Any], Any] | None = None, min_position: Position | None = None,
                    exists_filter: str | None = None) -> T:
        """The value of ``key``, loading it with ``loader()`` on a miss (see :mod:`.core`).

        ``loader`` returns the value, or ``NOT_FOUND`` (or ``None``) for "no such row", which is
        cached for ``negative_ttl`` and returned as ``None``. Its exceptions are never cached.
        ``min_position`` (or a :meth:`read_your_writes` scope): nothing older than that commit
        (docs/read-your-writes.md); not applied within ``ryw_timeout``: the loader's value, uncached
        (``ryw_on_timeout="bypass"``), or ``NotApplied``. ``exists_filter``: a table (``users``) whose
        existence filter is asked first; "definitely absent" returns ``None`` at once (docs/existence-filter.md).
        """
        if (min_position is not None or ACTIVE[0]) and not self._ryw(key, min_position):
            return run(self.core.bypass(loader), self._do, self.link)  # type: ignore[no-any-return]
        e = self._l1data.get(key)
        if e is not None:
            now = monotonic()
            if now < e.early:  # fresh, and far from expiry: the common case, kept lean
                e.ref = True
                self.stats.l1_hits += 1
                return None if e.negative else e.value  # type: ignore[return-value]
            how = self.core.late_hit(e, now, options)
            if how != MISS:
                if how == SERVE_AND_REFRESH:
                    self._background(key, loader, ttl, tags, options, e.generation, decode)
                return out(e)  # type: ignore[no-any-return]
        return run(self.core.get_or_load(key, loader, ttl, tags, options, decode, exists_filter),  # type: ignore[no-any-return]
                   self._do, self.link)

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

    # ---------------------------------------------------------------- single flight (threads)

    def _join(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str], has_fallback: bool,
              timeout: float | None) -> tuple[bool, Any]:
        """A ``JOIN`` step (see :mod:`.steps`): the untimed leader loads in the caller's thread."""
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
            self._submit(fl, key, loader, opts, tags, None, has_fallback)
        else:
            self._flight(fl, key, loader, opts, tags, None, has_fallback)
        if not fl.done and not fl.event.wait(timeout):  # type: ignore[union-attr]
            raise FlightTimedOut(timeout)
        return leader, fl.result()

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
            result = run(self.core.load(key, loader, opts, tags, refresh_of, has_fallback), self._do, self.link)
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

    # ---------------------------------------------------------------- writes

    def set(self, key: str, value: Any, *, ttl: Duration | None = None, tags: Iterable[str] = (),
            options: EntryOptions | None = None) -> bool:
        """Write-through after the app changed the database. Goes through the guard too: if a change
        reached the key meanwhile (possibly this very write, via the daemon), the newer state wins and
        this process's L1 drops the key. Other processes' L1s drop it via the backplane.

        Returns whether L2 took the value (False: refused by the guard, or Redis unreachable).
        """
        return bool(run(self.core.set(key, value, ttl, tags, options), self._do, self.link))

    def delete(self, key: str) -> bool:
        """Invalidate ``key`` everywhere: a tombstone in L2 (fills in flight fail), this L1, other L1s via the
        backplane. Returns False when Redis was unreachable (only this process's L1 dropped it)."""
        return bool(run(self.core.delete(key), self._do, self.link))

    def invalidate_tag(self, tag: str) -> bool:
        """O(1): bump the tag's counter; every entry that recorded the old value misses, everywhere.
        Returns False when Redis was unreachable (only this process's L1 dropped them)."""
        return bool(run(self.core.invalidate_tag(tag), self._do, self.link))

    # ---------------------------------------------------------------- decorator

    def cached(self, key: str, tags: Sequence[str] = (), ttl: Duration | None = None,
               options: EntryOptions | None = None, decode: Callable[[Any], Any] | None = None,
               exists_filter: str | None = None) -> Callable[[Callable[P, T]], CachedFunction[P, T]]:
        """``@cache.cached(key="user:{user_id}", tags=["tenant:{tenant_id}"], ttl=60)`` on a sync function.

        Templates are filled from the function's arguments by name (defaults included). The wrapper
        has ``.key(*args, **kwargs)`` and ``.invalidate(*args, **kwargs)``. For ``async def``
        functions use :meth:`AsyncCache.cached`.
        """

        def deco(fn: Callable[P, T]) -> CachedFunction[P, T]:
            if inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is async: decorate it with an AsyncCache")
            tpl = KeyTemplate(fn, key, tags)

            def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                k, t = tpl.render(args, kwargs)
                if k is None:  # a None/empty key argument: no such key (the daemon writes none), not cached
                    return fn(*args, **kwargs)
                return self.get_or_load(k, lambda: fn(*args, **kwargs), ttl=ttl, tags=t, options=options,
                                        decode=decode, exists_filter=exists_filter)

            def invalidate(*a: P.args, **kw: P.kwargs) -> bool:
                k = tpl.render(a, kw)[0]
                return self.delete(k) if k is not None else False

            return decorated(fn, wrapper, tpl, invalidate)  # type: ignore[no-any-return]

        return deco

    # ---------------------------------------------------------------- read-your-writes

    def wait_applied(self, position: Position, timeout: float | None = None) -> bool:
        """Wait until the daemon applied every commit up to ``position`` (and announced it, so this
        process's L1 dropped what it changed); False after ``timeout`` (default ``ryw_timeout``)."""
        return bool(run(self.core.wait_applied(position, timeout), self._do, self.link))

    def _ryw(self, key: str, min_position: Position | None) -> bool:
        return bool(run(self.core.read_your_writes(key, min_position), self._do, self.link))
