"""The asyncio cache: the same semantics as :class:`cdcd.client.Cache` over ``redis.asyncio``.

Shares L1, options, the fill-guard protocol and the backplane sequence tracking with the sync cache;
only the I/O differs. Loaders may be coroutine functions or plain callables (run in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import RedisError

from cdcd.backplane import Message, Sequencer
from cdcd.client.breaker import CircuitBreaker
from cdcd.client.cache import L2Unavailable, log
from cdcd.client.l1 import L1, L1Entry
from cdcd.client.options import CacheOptions, EntryOptions
from cdcd.client.protocol import (
    NOT_FOUND,
    XFETCH_HORIZON,
    Registry,
    all_tags,
    decode_str,
    jittered,
    parse_read,
    snapshot_json,
    tags_valid,
    xfetch_due,
)
from cdcd.client.serializers import JsonSerializer, Serializer
from cdcd.client.stats import Stats
from cdcd.client.subscriber import SeqTracker
from cdcd.fillguard import Entry
from cdcd.keyspace import SCRIPTS, Keyspace

_READ, _FILL, _INVALIDATE = SCRIPTS["read"], SCRIPTS["fill"], SCRIPTS["invalidate"]
_BUMP, _ENSURE = SCRIPTS["bump_tag"], SCRIPTS["ensure_tag"]
_MISSING = object()
Loader = Callable[[], Any]


class AsyncCache:
    """Create inside a running event loop (``await AsyncCache.create(...)`` or ``start()``), one per process."""

    def __init__(self, client: aredis.Redis | str = "redis://127.0.0.1:6379/0", options: CacheOptions | None = None,
                 serializer: Serializer | None = None, rng: random.Random | None = None) -> None:
        self.options = opts = options or CacheOptions()
        if isinstance(client, str):
            client = aredis.Redis.from_url(client, socket_timeout=opts.redis_timeout,
                                           socket_connect_timeout=opts.redis_timeout)
        self.redis: Any = client
        self.keyspace = Keyspace(opts.prefix, opts.channel)
        self.serializer = serializer or JsonSerializer()
        self.stats = Stats()
        self.l1 = L1(opts.l1_max_entries, opts.l1_max_bytes, self.stats)
        self._l1data = self.l1.data
        self.breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_reset)
        self.registry = Registry()
        self._registry_at = -math.inf
        self.rng = rng or random.Random()
        self._flights: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sequencer = Sequencer("app")
        self.tracker = SeqTracker(self.sequencer.run)
        self.connected = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> AsyncCache:
        cache = cls(*args, **kwargs)
        await cache.start()
        return cache

    async def start(self) -> None:
        if self.options.subscribe and self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for t in list(self._tasks):
            t.cancel()
        await self.redis.aclose()

    async def wait_subscribed(self, timeout: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ---------------------------------------------------------------- Redis plumbing

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        if not self.breaker.allow():
            raise L2Unavailable("circuit breaker open")
        try:
            try:
                result = await fn()
            except RedisError as exc:
                if "NOSCRIPT" not in str(exc):
                    raise
                for s in SCRIPTS.values():
                    await self.redis.script_load(s.source)
                result = await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.redis_errors += 1
            if self.breaker.failure():
                self.stats.breaker_open += 1
            raise L2Unavailable(str(exc)) from exc
        self.breaker.success()
        return result

    async def _refresh_registry(self) -> None:
        now = time.monotonic()
        if now - self._registry_at < self.options.registry_refresh:
            return
        self._registry_at = now
        with contextlib.suppress(L2Unavailable):
            self.registry.load(await self._call(lambda: self.redis.get(self.keyspace.registry)))

    async def _read(self, key: str, tags: list[str], lease: bool) -> tuple[Entry, dict[str, Any]]:
        rk = self.keyspace.entry(key)
        tag_keys = [self.keyspace.tag(t) for t in tags]

        async def go() -> list[Any]:
            pipe: Any = self.redis.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", _READ.sha, 1, rk, int(self.options.lease_ttl * 1000), "1" if lease else "0")
            if tag_keys:
                pipe.mget(tag_keys)
            res: list[Any] = await pipe.execute(raise_on_error=False)
            for r in res:
                if isinstance(r, Exception):
                    raise r
            return res

        res = await self._call(go)
        entry = parse_read(key, res[0])
        current: dict[str, Any] = dict(zip(tags, res[1], strict=True)) if tag_keys else {}
        extra = [t for t in entry.tags if t not in current]
        if extra:
            values = await self._call(lambda: self.redis.mget([self.keyspace.tag(t) for t in extra]))
            current.update(zip(extra, values, strict=True))
        return entry, current

    async def _tag_snapshot(self, tags: Sequence[str], current: dict[str, Any]) -> dict[str, str]:
        snap: dict[str, str] = {}
        for t in tags:
            v = decode_str(current.get(t))
            if v is None:
                ensure = functools.partial(self.redis.execute_command, "EVALSHA", _ENSURE.sha, 1, self.keyspace.tag(t))
                v = decode_str(await self._call(ensure))
            snap[t] = v or ""
        return snap

    def _l1_put(self, key: str, value: Any, negative: bool, tags: Sequence[str], opts: EntryOptions,
                delta: float, size: int) -> None:
        now = time.monotonic()
        hard = now + jittered(opts.l1_hard if not negative else min(opts.negative_ttl, opts.l1_hard),
                              opts.jitter, self.rng)
        soft = min(hard, now + jittered(opts.l1_soft, opts.jitter, self.rng)) if not negative else hard
        keep = hard + (opts.fail_safe_max_age if opts.fail_safe else 0.0)
        e = L1Entry(value, soft, hard, keep, tuple(tags), size, negative, delta)
        if opts.early_refresh_beta and delta:
            e.early = soft - XFETCH_HORIZON * delta * opts.early_refresh_beta
        self.l1.put(key, e)

    # ---------------------------------------------------------------- public API

    async def get(self, key: str, default: Any = None) -> Any:
        e = self._l1data.get(key)
        if e is not None and time.monotonic() < e.hard:
            self.stats.l1_hits += 1
            return default if e.negative else e.value
        self.stats.l1_misses += 1
        try:
            await self._refresh_registry()
            entry, current = await self._read(key, [], lease=False)
        except L2Unavailable:
            return default
        if not entry.hit or not tags_valid(entry, current):
            self.stats.l2_misses += 1
            return default
        self.stats.l2_hits += 1
        value = None if entry.negative else self.serializer.loads(entry.value or b"")
        self._l1_put(key, value, entry.negative, list(entry.tags), self.options.entry, 0.0, len(entry.value or b""))
        return default if entry.negative else value

    async def get_or_load(self, key: str, loader: Loader, *, ttl: float | None = None, tags: Iterable[str] = (),
                          options: EntryOptions | None = None) -> Any:
        e = self._l1data.get(key)
        if e is not None:
            now = time.monotonic()
            if now < e.early:  # fresh, and far from expiry: the common case, kept lean
                self.stats.l1_hits += 1
                return None if e.negative else e.value
            if now < e.soft:
                beta = (options or self.options.entry).early_refresh_beta
                if beta and e.delta and not e.refreshing and \
                        xfetch_due(e.delta, beta, e.soft - now, self.rng.random()):
                    self.stats.early_refreshes += 1
                    self._background(key, loader, ttl, tags, options, e)
                self.stats.l1_hits += 1
                return None if e.negative else e.value
            if now < e.hard:
                self.stats.stale_served += 1
                if not e.refreshing:
                    self._background(key, loader, ttl, tags, options, e)
                return None if e.negative else e.value
        self.stats.l1_misses += 1
        fut = self._flights.get(key)
        if fut is not None:
            self.stats.coalesced += 1
            return await asyncio.shield(fut)
        fut = self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            result = await self._load(key, loader, ttl, tags, options, background=False)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: followers may not exist
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            self._flights.pop(key, None)

    async def set(self, key: str, value: Any, *, ttl: float | None = None, tags: Iterable[str] = (),
                  options: EntryOptions | None = None) -> bool:
        opts = (options or self.options.entry).merged(ttl=ttl)
        data = self.serializer.dumps(value)
        tag_list = all_tags(key, tags, self.registry)
        self._l1_put(key, value, False, tag_list, opts, 0.0, len(data))
        try:
            entry, current = await self._read(key, tag_list, lease=True)
            ok = await self._fill(entry, data, False, await self._tag_snapshot(tag_list, current), opts)
        except L2Unavailable:
            return False
        await self._publish(keys=[key])
        return ok

    async def delete(self, key: str) -> None:
        self.l1.remove(key)
        with contextlib.suppress(L2Unavailable):
            await self._call(lambda: self.redis.execute_command(
                "EVALSHA", _INVALIDATE.sha, 1, self.keyspace.entry(key), int(self.options.entry.ttl * 1000)))
        await self._publish(keys=[key])

    async def invalidate_tag(self, tag: str) -> None:
        self.l1.expire_tag(tag)
        with contextlib.suppress(L2Unavailable):
            await self._call(lambda: self.redis.execute_command("EVALSHA", _BUMP.sha, 1, self.keyspace.tag(tag)))
        await self._publish(tags=[tag])

    def cached(self, key: str, tags: Sequence[str] = (), ttl: float | None = None,
               options: EntryOptions | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator for ``async def`` functions; see :meth:`Cache.cached`."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            sig = inspect.signature(fn)

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                return await self.get_or_load(key.format(**a), lambda: fn(*args, **kwargs), ttl=ttl,
                                              tags=[t.format(**a) for t in tags], options=options)

            return wrapper

        return deco

    # ---------------------------------------------------------------- miss path

    def _background(self, key: str, loader: Loader, ttl: float | None, tags: Iterable[str],
                    options: EntryOptions | None, e: L1Entry) -> None:
        e.refreshing = True
        self.stats.refreshes += 1

        async def run() -> None:
            try:
                await self._load(key, loader, ttl, list(tags), options, background=True)
            except Exception as exc:
                log.debug("background_refresh_failed", key=key, error=str(exc))
            finally:
                e.refreshing = False

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call_loader(self, loader: Loader) -> Any:
        result = loader()
        if inspect.isawaitable(result):
            return await result
        return result

    async def _load(self, key: str, loader: Loader, ttl: float | None, tags: Iterable[str],
                    options: EntryOptions | None, background: bool) -> Any:
        opts = (options or self.options.entry).merged(ttl=ttl)
        await self._refresh_registry()
        tag_list = all_tags(key, tags, self.registry)
        entry: Entry | None = None
        snap: dict[str, str] | None = None
        l2_value: Any = _MISSING
        try:
            entry, current = await self._read(key, tag_list, lease=True)
            if entry.hit and not background:
                if tags_valid(entry, current):
                    self.stats.l2_hits += 1
                    value = NOT_FOUND if entry.negative else self.serializer.loads(entry.value or b"")
                    self._l1_put(key, value, entry.negative, list(entry.tags), opts, 0.0, len(entry.value or b""))
                    return None if entry.negative else value
                if not entry.negative:
                    l2_value = self.serializer.loads(entry.value or b"")
            self.stats.l2_misses += 1
            snap = await self._tag_snapshot(tag_list, current)
        except L2Unavailable:
            entry = None
        fallback: Any = _MISSING
        if opts.fail_safe:
            e = self._l1data.get(key)
            fallback = (None if e.negative else e.value) if e is not None and time.monotonic() < e.keep else l2_value
        timeout = opts.loader_hard_timeout
        if fallback is not _MISSING and opts.loader_soft_timeout is not None:
            timeout = opts.loader_soft_timeout
        self.stats.loader_calls += 1
        t0 = time.monotonic()
        task = asyncio.ensure_future(self._call_loader(loader))
        try:
            value = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            self.stats.loader_timeouts += 1

            def late(t: asyncio.Future[Any]) -> None:
                if not t.cancelled() and t.exception() is None:
                    bg = asyncio.create_task(self._store(key, t.result(), opts, entry, snap, tag_list,
                                                         time.monotonic() - t0))
                    self._tasks.add(bg)
                    bg.add_done_callback(self._tasks.discard)

            task.add_done_callback(late)
            if fallback is not _MISSING:
                self.stats.fail_safe += 1
                return fallback
            raise
        except Exception:
            self.stats.loader_errors += 1
            if fallback is not _MISSING:
                self.stats.fail_safe += 1
                return fallback
            raise
        return await self._store(key, value, opts, entry, snap, tag_list, time.monotonic() - t0)

    async def _store(self, key: str, value: Any, opts: EntryOptions, entry: Entry | None,
                     snap: dict[str, str] | None, tag_list: list[str], delta: float) -> Any:
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else self.serializer.dumps(value)
        accepted = True
        if entry is not None and snap is not None:
            try:
                accepted = await self._fill(entry, data, negative, snap, opts)
            except L2Unavailable:
                accepted = True
        if accepted:
            self._l1_put(key, NOT_FOUND if negative else value, negative, tag_list, opts, delta, len(data))
        else:
            self.l1.remove(key)
        return None if negative else value

    async def _fill(self, entry: Entry, data: bytes, negative: bool, snap: dict[str, str],
                    opts: EntryOptions) -> bool:
        ttl_ms = max(1, int(jittered(opts.negative_ttl if negative else opts.ttl, opts.jitter, self.rng) * 1000))
        res = await self._call(lambda: self.redis.execute_command(
            "EVALSHA", _FILL.sha, 1, self.keyspace.entry(entry.key), entry.generation or "", ttl_ms, data,
            "1" if negative else "0", snapshot_json(snap)))
        ok = res not in (0, b"0", "0", None)
        if ok:
            self.stats.fills += 1
            self.stats.negative_fills += int(negative)
        else:
            self.stats.fills_refused += 1
        return ok

    # ---------------------------------------------------------------- backplane

    async def _publish(self, keys: Sequence[str] = (), tags: Sequence[str] = ()) -> None:
        if not self.options.publish:
            return
        for m in self.sequencer.messages([self.keyspace.entry(k) for k in keys], tags, "", time.time()):
            with contextlib.suppress(L2Unavailable):
                await self._call(functools.partial(self.redis.publish, self.keyspace.channel, m.encode()))

    def reset_l1(self, why: str) -> None:
        self.stats.l1_resets += 1
        self.l1.expire_all()
        log.debug("l1_reset", reason=why)

    def _handle(self, data: bytes | str) -> None:
        try:
            msg = Message.decode(data)
        except ValueError:
            self.reset_l1("malformed backplane message")
            return
        if msg.run == self.sequencer.run:
            return
        self.stats.backplane_messages += 1
        why = self.tracker.check(msg)
        if why is not None:
            self.stats.backplane_gaps += int(why.startswith("gap"))
            self.reset_l1(why)
            return
        n = len(self.keyspace.prefix)
        for k in msg.keys:
            if k.startswith(self.keyspace.prefix):
                self.l1.expire(k[n:])
        for t in msg.tags:
            self.l1.expire_tag(t)
            if t.startswith("__table:"):
                self._registry_at = -math.inf

    async def _redis_reachable(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def _listen(self) -> None:
        delay = 0.05
        pool = self.redis.connection_pool
        while True:
            pubsub: Any = None
            try:
                own = aredis.ConnectionPool(connection_class=pool.connection_class, **{
                    **pool.connection_kwargs, "socket_timeout": 5.0, "health_check_interval": 2})
                pubsub = aredis.Redis(connection_pool=own).pubsub()
                await pubsub.subscribe(self.keyspace.channel)
                while True:
                    msg = await pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self.reset_l1("backplane (re)subscribed")
                        self.connected.set()
                        delay = 0.05
                    elif msg["type"] == "message":
                        self._handle(msg["data"])
            except (RedisError, OSError) as exc:
                if self.connected.is_set() and await self._redis_reachable():
                    self.reset_l1(f"backplane connection lost: {exc}")  # see Subscriber.run
                self.connected.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
