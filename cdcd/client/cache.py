"""The sync two-tier cache: L1 in process, L2 in Redis, kept honest by the daemon's versions and backplane.

``get_or_load`` in order:

1. L1 fresh -> return (XFetch may start one early background refresh);
   L1 stale (past soft TTL) -> return at once, one background refresh.
2. L2 (one round trip: READ script for value + fill token, MGET of the tag counters) -> a value whose
   tags still hold the counters it recorded fills L1 and is returned.
3. Miss -> single flight (one loader call per key per process; optionally one per key across processes
   with a Redis lock), tag counters recorded *before* the loader runs, the loader, then FILL through the
   guard: refused when any change reached the key since the token. A refused fill is not an error.
4. Loader error or timeout -> the last known value if it is within ``fail_safe_max_age`` (fail-safe),
   else the error. Redis errors feed a circuit breaker; while it is open L2 is skipped and L1 serves.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from cdcd.backplane import Message, Sequencer
from cdcd.client.breaker import CircuitBreaker
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
from cdcd.fillguard import Entry
from cdcd.keyspace import SCRIPTS, Keyspace

try:  # structlog is optional: the client needs only redis
    import structlog

    log: Any = structlog.get_logger("cdcd.client")
except ImportError:  # pragma: no cover - exercised only without structlog
    import logging

    log = logging.getLogger("cdcd.client")

T = TypeVar("T")
_READ, _FILL, _INVALIDATE = SCRIPTS["read"], SCRIPTS["fill"], SCRIPTS["invalidate"]
_BUMP, _ENSURE = SCRIPTS["bump_tag"], SCRIPTS["ensure_tag"]
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_MISSING = object()


class L2Unavailable(Exception):
    """Redis is down or the breaker is open: callers degrade to L1 + loader."""


class Cache:
    """Thread-safe; create one per process and share it."""

    def __init__(self, client: redis.Redis | str = "redis://127.0.0.1:6379/0", options: CacheOptions | None = None,
                 serializer: Serializer | None = None, rng: random.Random | None = None) -> None:
        self.options = opts = options or CacheOptions()
        if isinstance(client, str):
            client = redis.Redis.from_url(client, socket_timeout=opts.redis_timeout,
                                          socket_connect_timeout=opts.redis_timeout)
        self.redis: Any = client
        self.keyspace = Keyspace(opts.prefix, opts.channel)
        self.serializer = serializer or JsonSerializer()
        self.stats = Stats()
        self.l1 = L1(opts.l1_max_entries, opts.l1_max_bytes, self.stats)
        self._l1data = self.l1.data  # bound once: the hit path avoids an attribute hop
        self.breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_reset)
        self.registry = Registry()
        self._registry_at = -math.inf
        self.rng = rng or random.Random()
        self._flights: dict[str, concurrent.futures.Future[Any]] = {}
        self._flight_lock = threading.Lock()
        self._locks: dict[str, tuple[str, str]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(opts.background_workers, thread_name_prefix="cdcd-cache")
        self.sequencer = Sequencer("app")
        self._subscriber: Any = None
        self._closed = False
        if opts.subscribe:
            from cdcd.client.subscriber import Subscriber

            self._subscriber = Subscriber(self)
            self._subscriber.start()

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._closed = True
        if self._subscriber is not None:
            self._subscriber.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        return self._subscriber is not None and self._subscriber.connected.wait(timeout)

    # ---------------------------------------------------------------- Redis plumbing

    def _call(self, fn: Callable[[], T]) -> T:
        if not self.breaker.allow():
            raise L2Unavailable("circuit breaker open")
        try:
            result = fn()
        except NoScriptError:
            self._load_scripts()
            try:
                result = fn()
            except RedisError as exc:
                self._failed(exc)
                raise L2Unavailable(str(exc)) from exc
        except RedisError as exc:
            if isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT"):
                self._load_scripts()
                return self._call(fn)
            self._failed(exc)
            raise L2Unavailable(str(exc)) from exc
        self.breaker.success()
        return result

    def _failed(self, exc: Exception) -> None:
        self.stats.redis_errors += 1
        if self.breaker.failure():
            self.stats.breaker_open += 1
            log.debug("redis_breaker_open", error=str(exc))

    def _load_scripts(self) -> None:
        for s in SCRIPTS.values():
            self.redis.script_load(s.source)

    def _script(self, pipe: Any, script: Any, key: str, *args: Any) -> None:
        pipe.execute_command("EVALSHA", script.sha, 1, key, *args)

    def _refresh_registry(self) -> None:
        now = time.monotonic()
        if now - self._registry_at < self.options.registry_refresh:
            return
        self._registry_at = now
        with contextlib.suppress(L2Unavailable):
            self.registry.load(self._call(lambda: self.redis.get(self.keyspace.registry)))

    def _read(self, key: str, tags: list[str], lease: bool) -> tuple[Entry, dict[str, Any]]:
        """Entry + fill token + current tag counters, in one round trip."""
        rk = self.keyspace.entry(key)
        tag_keys = [self.keyspace.tag(t) for t in tags]

        def go() -> list[Any]:
            if not tag_keys:  # one command: no pipeline object to build
                if not lease:  # a plain read needs no script
                    return [self.redis.execute_command("HMGET", rk, "v", "g", "d", "n", "t")]
                return [self.redis.execute_command("EVALSHA", _READ.sha, 1, rk, int(self.options.lease_ttl * 1000),
                                                   "1")]
            pipe: Any = self.redis.pipeline(transaction=False)
            self._script(pipe, _READ, rk, int(self.options.lease_ttl * 1000), "1" if lease else "0")
            if tag_keys:
                pipe.mget(tag_keys)
            res: list[Any] = pipe.execute(raise_on_error=False)
            for r in res:
                if isinstance(r, Exception):
                    raise r
            return res

        res = self._call(go)
        entry = parse_read(key, res[0])
        current: dict[str, Any] = dict(zip(tags, res[1], strict=True)) if tag_keys else {}
        extra = [t for t in entry.tags if t not in current]
        if extra:  # filled by a caller that named other tags
            values = self._call(lambda: self.redis.mget([self.keyspace.tag(t) for t in extra]))
            current.update(zip(extra, values, strict=True))
        return entry, current

    def _tag_snapshot(self, tags: Sequence[str], current: dict[str, Any]) -> dict[str, str]:
        """Counters to record with a fill, taken before the loader runs; missing ones are created."""
        snap: dict[str, str] = {}
        for t in tags:
            v = decode_str(current.get(t))
            if v is None:
                ensure = functools.partial(self.redis.execute_command, "EVALSHA", _ENSURE.sha, 1, self.keyspace.tag(t))
                v = decode_str(self._call(ensure))
            snap[t] = v or ""
        return snap

    # ---------------------------------------------------------------- L1 helpers

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

    @staticmethod
    def _out(e: L1Entry) -> Any:
        return None if e.negative else e.value

    # ---------------------------------------------------------------- public API

    def get(self, key: str, default: Any = None) -> Any:
        """L1, then L2 (no loader, no fill). Tags are validated as recorded by the entry."""
        e = self._l1data.get(key)
        if e is not None and time.monotonic() < e.hard:
            self.stats.l1_hits += 1
            return default if e.negative else e.value
        self.stats.l1_misses += 1
        try:
            self._refresh_registry()
            entry, current = self._read(key, [], lease=False)
        except L2Unavailable:
            return default
        if not entry.hit or not tags_valid(entry, current):
            self.stats.l2_misses += 1
            return default
        self.stats.l2_hits += 1
        value = None if entry.negative else self.serializer.loads(entry.value or b"")
        self._l1_put(key, value, entry.negative, list(entry.tags), self.options.entry, 0.0, len(entry.value or b""))
        return default if entry.negative else value

    def get_or_load(self, key: str, loader: Callable[[], Any], *, ttl: float | None = None,
                    tags: Iterable[str] = (), options: EntryOptions | None = None) -> Any:
        e = self._l1data.get(key)
        if e is not None:
            now = time.monotonic()
            if now < e.early:  # fresh, and far from expiry: the common case, kept lean
                self.stats.l1_hits += 1
                return None if e.negative else e.value
            if now < e.soft:
                opts = options or self.options.entry
                beta = opts.early_refresh_beta
                if beta and e.delta and not e.refreshing and \
                        xfetch_due(e.delta, beta, e.soft - now, self.rng.random()):
                    self.stats.early_refreshes += 1
                    self._background(key, loader, ttl, tags, options, e)
                self.stats.l1_hits += 1
                return None if e.negative else e.value
            if now < e.hard:  # stale-while-revalidate
                self.stats.stale_served += 1
                if not e.refreshing:
                    self._background(key, loader, ttl, tags, options, e)
                return None if e.negative else e.value
        self.stats.l1_misses += 1
        return self._coalesced(key, loader, ttl, tags, options)

    def set(self, key: str, value: Any, *, ttl: float | None = None, tags: Iterable[str] = (),
            options: EntryOptions | None = None) -> bool:
        """Write-through after the app changed the database. Goes through the guard too: if a change
        reached the key meanwhile (possibly this very write, via the daemon), the daemon's state wins.
        Other processes' L1s drop the key via the backplane. Returns whether L2 took the value."""
        opts = (options or self.options.entry).merged(ttl=ttl)
        data = self.serializer.dumps(value)
        tag_list = all_tags(key, tags, self.registry)
        self._l1_put(key, value, False, tag_list, opts, 0.0, len(data))
        try:
            entry, current = self._read(key, tag_list, lease=True)
            snap = self._tag_snapshot(tag_list, current)
            ok = self._fill(entry, data, False, snap, opts)
        except L2Unavailable:
            return False
        self._publish(keys=[key])
        return ok

    def delete(self, key: str) -> None:
        self.l1.remove(key)
        with contextlib.suppress(L2Unavailable):
            self._call(lambda: self.redis.execute_command(
                "EVALSHA", _INVALIDATE.sha, 1, self.keyspace.entry(key), int(self.options.entry.ttl * 1000)))
        self._publish(keys=[key])

    def invalidate_tag(self, tag: str) -> None:
        """O(1): bump the counter; entries that recorded the old value now miss everywhere."""
        self.l1.expire_tag(tag)
        with contextlib.suppress(L2Unavailable):
            self._call(lambda: self.redis.execute_command("EVALSHA", _BUMP.sha, 1, self.keyspace.tag(tag)))
        self._publish(tags=[tag])

    def cached(self, key: str, tags: Sequence[str] = (), ttl: float | None = None,
               options: EntryOptions | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@cache.cached(key="user:{user_id}", tags=["tenant:{tenant_id}"], ttl=60)``.
        Templates are filled from the function's arguments by name. Sync functions only; see AsyncCache."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            sig = inspect.signature(fn)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                return self.get_or_load(key.format(**a), lambda: fn(*args, **kwargs), ttl=ttl,
                                        tags=[t.format(**a) for t in tags], options=options)

            return wrapper

        return deco

    # ---------------------------------------------------------------- miss path

    def _coalesced(self, key: str, loader: Callable[[], Any], ttl: float | None, tags: Iterable[str],
                   options: EntryOptions | None) -> Any:
        with self._flight_lock:
            fut = self._flights.get(key)
            leader = fut is None
            if leader:
                fut = self._flights[key] = concurrent.futures.Future()
        assert fut is not None
        if not leader:
            self.stats.coalesced += 1
            return fut.result()
        try:
            result = self._load(key, loader, ttl, tags, options, background=False)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._flight_lock:
                self._flights.pop(key, None)

    def _background(self, key: str, loader: Callable[[], Any], ttl: float | None, tags: Iterable[str],
                    options: EntryOptions | None, e: L1Entry) -> None:
        e.refreshing = True
        self.stats.refreshes += 1
        tag_list = list(tags)

        def run() -> None:
            try:
                self._load(key, loader, ttl, tag_list, options, background=True)
            except Exception as exc:
                log.debug("background_refresh_failed", key=key, error=str(exc))
            finally:
                e.refreshing = False

        try:
            self._pool.submit(run)
        except RuntimeError:  # closed
            e.refreshing = False

    def _load(self, key: str, loader: Callable[[], Any], ttl: float | None, tags: Iterable[str],
              options: EntryOptions | None, background: bool) -> Any:
        opts = (options or self.options.entry).merged(ttl=ttl)
        self._refresh_registry()
        tag_list = all_tags(key, tags, self.registry)
        entry: Entry | None = None
        snap: dict[str, str] | None = None
        l2_value: Any = _MISSING
        try:
            entry, current = self._read(key, tag_list, lease=True)
            if entry.hit and not background:
                if tags_valid(entry, current):
                    self.stats.l2_hits += 1
                    value = NOT_FOUND if entry.negative else self.serializer.loads(entry.value or b"")
                    self._l1_put(key, value, entry.negative, list(entry.tags), opts, 0.0, len(entry.value or b""))
                    return None if entry.negative else value
                if not entry.negative:
                    l2_value = self.serializer.loads(entry.value or b"")  # stale by tags: a fail-safe fallback
            self.stats.l2_misses += 1
            snap = self._tag_snapshot(tag_list, current)
            if opts.distributed_lock:
                got = self._await_other_process(key, entry, tag_list, opts)
                if got is not _MISSING:
                    return got
        except L2Unavailable:
            entry = None
        try:
            return self._run_loader(key, loader, opts, entry, snap, tag_list, l2_value)
        finally:
            if opts.distributed_lock:
                self._release_lock(key)

    def _run_loader(self, key: str, loader: Callable[[], Any], opts: EntryOptions, entry: Entry | None,
                    snap: dict[str, str] | None, tag_list: list[str], l2_value: Any) -> Any:
        fallback = self._fallback(key, opts, l2_value)
        timeout = opts.loader_hard_timeout
        if fallback is not _MISSING and opts.loader_soft_timeout is not None:
            timeout = opts.loader_soft_timeout
        self.stats.loader_calls += 1
        t0 = time.monotonic()
        if timeout is None:
            try:
                value = loader()
            except Exception:
                self.stats.loader_errors += 1
                if fallback is not _MISSING:
                    self.stats.fail_safe += 1
                    return fallback
                raise
            return self._store(key, value, opts, entry, snap, tag_list, time.monotonic() - t0)
        fut = self._pool.submit(loader)
        try:
            value = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self.stats.loader_timeouts += 1
            # the loader finishes in the background and still fills the cache (through the guard)
            fut.add_done_callback(lambda f: self._store_late(key, f, opts, entry, snap, tag_list, t0))
            if fallback is not _MISSING:
                self.stats.fail_safe += 1
                return fallback
            raise TimeoutError(f"loader for {key!r} took longer than {timeout}s") from None
        except Exception:
            self.stats.loader_errors += 1
            if fallback is not _MISSING:
                self.stats.fail_safe += 1
                return fallback
            raise
        return self._store(key, value, opts, entry, snap, tag_list, time.monotonic() - t0)

    def _store_late(self, key: str, fut: concurrent.futures.Future[Any], opts: EntryOptions, entry: Entry | None,
                    snap: dict[str, str] | None, tag_list: list[str], t0: float) -> None:
        if fut.exception() is None:
            with contextlib.suppress(Exception):
                self._store(key, fut.result(), opts, entry, snap, tag_list, time.monotonic() - t0)

    def _fallback(self, key: str, opts: EntryOptions, l2_value: Any) -> Any:
        if not opts.fail_safe:
            return _MISSING
        e = self._l1data.get(key)
        if e is not None and time.monotonic() < e.keep:
            return self._out(e)
        return l2_value

    def _store(self, key: str, value: Any, opts: EntryOptions, entry: Entry | None, snap: dict[str, str] | None,
               tag_list: list[str], delta: float) -> Any:
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else self.serializer.dumps(value)
        accepted = True
        if entry is not None and snap is not None:
            try:
                accepted = self._fill(entry, data, negative, snap, opts)
            except L2Unavailable:
                accepted = True  # L2 is down: L1 alone, bounded by its TTL and reset on reconnect
        if accepted:
            self._l1_put(key, NOT_FOUND if negative else value, negative, tag_list, opts, delta, len(data))
        else:
            self.l1.remove(key)  # a newer change reached the key while we loaded: keep no copy of ours
        return None if negative else value

    def _fill(self, entry: Entry, data: bytes, negative: bool, snap: dict[str, str], opts: EntryOptions) -> bool:
        ttl = opts.negative_ttl if negative else opts.ttl
        ttl_ms = max(1, int(jittered(ttl, opts.jitter, self.rng) * 1000))
        res = self._call(lambda: self.redis.execute_command(
            "EVALSHA", _FILL.sha, 1, self.keyspace.entry(entry.key), entry.generation or "", ttl_ms, data,
            "1" if negative else "0", snapshot_json(snap)))
        ok = res not in (0, b"0", "0", None)
        if ok:
            self.stats.fills += 1
            if negative:
                self.stats.negative_fills += 1
        else:
            self.stats.fills_refused += 1
        return ok

    def _await_other_process(self, key: str, entry: Entry | None, tags: list[str], opts: EntryOptions) -> Any:
        """Cross-process single flight: the lock holder loads; others wait for its fill (at most lock_ttl)."""
        lock = f"{self.keyspace.entry(key)}:__lock"
        token = self.sequencer.run + str(threading.get_ident())
        if self._call(lambda: self.redis.set(lock, token, nx=True, px=int(opts.lock_ttl * 1000))):
            self._locks[key] = (lock, token)
            return _MISSING
        deadline = time.monotonic() + opts.lock_ttl
        while time.monotonic() < deadline:
            time.sleep(0.02)
            got, current = self._read(key, tags, lease=False)
            if got.hit and tags_valid(got, current):
                self.stats.coalesced += 1
                return None if got.negative else self.serializer.loads(got.value or b"")
        return _MISSING  # the holder died or is slow: load ourselves

    def _release_lock(self, key: str) -> None:
        held = self._locks.pop(key, None)
        if held is not None:
            with contextlib.suppress(L2Unavailable):
                self._call(lambda: self.redis.eval(_UNLOCK, 1, held[0], held[1]))

    # ---------------------------------------------------------------- backplane

    def _publish(self, keys: Sequence[str] = (), tags: Sequence[str] = ()) -> None:
        if not self.options.publish:
            return
        for m in self.sequencer.messages([self.keyspace.entry(k) for k in keys], tags, "", time.time()):
            with contextlib.suppress(L2Unavailable):
                self._call(functools.partial(self.redis.publish, self.keyspace.channel, m.encode()))

    def apply_message(self, msg: Message) -> None:
        """Drop what a backplane message names (called by the subscriber)."""
        prefix = self.keyspace.prefix
        n = len(prefix)
        for k in msg.keys:
            if k.startswith(prefix):
                self.l1.expire(k[n:])
        for t in msg.tags:
            self.l1.expire_tag(t)
            if t.startswith("__table:"):
                self._registry_at = -math.inf  # cheap: a truncate is a good moment to re-read the rules

    def reset_l1(self, why: str) -> None:
        """The backplane may have lost messages: nothing in L1 can be trusted to be current."""
        self.stats.l1_resets += 1
        self.l1.expire_all()
        log.debug("l1_reset", reason=why)
