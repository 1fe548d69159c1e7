"""The cache's whole flow, written once and without I/O (sans-IO, as h11 and psycopg 3 do it).

``get_or_load`` past an L1 fresh hit, in order:

1. L1 stale (past the soft TTL) -> served at once, one background refresh (stale-while-revalidate);
   inside the XFetch window, one early refresh with the XFetch probability.
2. L2, one round trip (entry + fill token, its TTL, the tag counters): a value whose recorded tag
   counters are all current fills L1 and is returned. It keeps its age: a value loaded long ago by
   another process is not fresh again in this one.
3. Miss -> single flight (one loader call per key per process, background refreshes included;
   optionally one per key across processes with a Redis lock); the token and the tag counters are
   taken *before* the loader runs; then FILL through the guard, refused when any change reached the
   key since the token. A refused fill is not an error: the caller gets what it loaded, L2 keeps the
   newer state, and L1 keeps no copy.
4. Loader error or timeout, or Redis unreachable -> the last known value if it is within
   ``fail_safe_max_age`` (fail-safe), else the error. Redis errors feed a circuit breaker; while it is
   open Redis is not called and L1 serves. A key with nothing in L1 is loaded without L2.

Each flow is a generator: it yields a :mod:`step <.steps>` (a Redis batch, "call the loader", "join
the key's flight", "wait for the watermark"...) and receives its outcome, so the same code runs under
the thread driver (:class:`~.cache.Cache`) and the asyncio driver (:class:`~.aio.AsyncCache`). The
driver keeps only the L1 fresh hit (a plain fast path, no generator) and the concurrency primitives.

L1 inserts are fenced against invalidations that overtake them (see :mod:`.l1`), so a value read
before a change can never be inserted after the change's backplane message.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from time import monotonic
from typing import Any

from cdcd.backplane import Message, Sequencer
from cdcd.keys import check_name
from cdcd.keyspace import Keyspace

from ._log import log
from .breaker import CircuitBreaker
from .consistency import (
    REDIS_CHECK_EVERY,
    NotApplied,
    Position,
    Satisfied,
    Watermark,
    ambient_position,
    parse_position,
)
from .existence import ExistenceFilters, check
from .l1 import L1, L1Entry
from .link import UNLOCK, Command, L2Unavailable
from .options import CacheOptions, Duration, EntryOptions
from .protocol import (
    BUMP,
    INVALIDATE,
    MISSING,
    NOT_FOUND,
    Found,
    Registry,
    all_tags,
    check_names,
    decode_str,
    fill_command,
    fill_result,
    jittered,
    make_entry,
    parse_found,
    parse_replica,
    read_commands,
    read_replica_commands,
    xfetch_due,
)
from .serializers import Serializer
from .stats import Stats
from .steps import CALL, JOIN, LOAD, PUBLISH, REFRESH, SLEEP, WAIT_APPLIED, FlightTimedOut, Step, call
from .values import UnencodableValue, decode_entry, encode, frozen_or

Flow = Generator[Step, Any, Any]
_lock_ids = itertools.count()

# What :meth:`CacheCore.late_hit` decides for an L1 entry past its XFetch point.
MISS, SERVE, SERVE_AND_REFRESH = 0, 1, 2


def out(e: L1Entry) -> Any:
    return None if e.negative else e.value


class CacheCore:
    """The state and rules of one cache (L1, registry, breaker, counters, sequencer, watermark); the
    drivers own the connections, the threads or tasks, and the locks."""

    def __init__(self, options: CacheOptions, serializer: Serializer, rng: random.Random | None) -> None:
        self.options = opts = options
        self.keyspace = Keyspace(opts.prefix, opts.channel)
        self.serializer = serializer
        self.copy = opts.l1_copy
        self.stats = Stats()
        self.l1 = L1(opts.l1_max_entries, opts.l1_max_bytes, self.stats)
        self.breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_reset)
        self.registry = Registry()
        self.registry_next = -math.inf
        self.rng = rng or random.Random()
        self.sequencer = Sequencer("app")
        self.watermark = Watermark()
        self.exists = ExistenceFilters(self.keyspace)  # docs/existence-filter.md
        # hot-key replicas: the newest version seen per replicated key (bounded LRU; docs/hot-keys.md)
        self.seen: OrderedDict[str, int] = OrderedDict()

    @property
    def run_id(self) -> str:
        return self.sequencer.run

    @property
    def unverifiable(self) -> bool:
        """No registry in Redis (it restarted empty, or no daemon runs): entries cannot be checked against
        their tables' TRUNCATE counters, so every read is a miss and nothing is cached
        (``require_registry=False`` turns this off for uses without a daemon)."""
        return self.options.require_registry and not self.registry.found

    # ---------------------------------------------------------------- Redis plumbing

    def refresh_registry(self) -> Flow:
        """Re-read the rules; callers check ``monotonic() >= registry_next`` first (no generator on every
        L2 read)."""
        now = monotonic()
        self.registry_next = now + self.options.registry_refresh
        try:
            self.registry.load((yield call([("GET", self.keyspace.registry)], True))[0])
        except (L2Unavailable, ValueError) as exc:
            log.debug("registry_unavailable", error=str(exc))
        if self.unverifiable:  # Redis lost it: the daemon restores it within a heartbeat
            self.registry_next = now + min(self.options.registry_refresh, 1.0)

    def read(self, key: str, tags: Sequence[str], lease: bool, slot: int | None = None) -> Flow:
        """The entry, its TTL and tag counters (``lease``: and a fill token); ``slot``: of that replica copy.
        The hot paths (``get``, a load's first read) inline it as ``read_call`` + ``parse_found`` +
        ``complete``: one generator less."""
        if slot is None:
            found = parse_found(key, tags, (yield self.read_call(key, tags, lease)))
        else:
            found = self.parse_copy(key, tags, slot, (yield self.read_call(key, tags, lease, slot)))
        extra = found.missing()
        if extra:
            yield from self.complete(found, extra)
        return found

    def read_call(self, key: str, tags: Sequence[str], lease: bool, slot: int | None = None) -> Step:
        lease_ms = int(self.options.lease_ttl * 1000) if lease else None
        if slot is not None:
            return CALL, read_replica_commands(self.keyspace, key, slot, tags, lease_ms), False
        return CALL, read_commands(self.keyspace, key, tags, lease_ms), False

    def complete(self, found: Found, extra: list[str]) -> Flow:
        """The entry was filled by a caller that named other tags: their counters, one more round trip."""
        values = yield call([("GET", self.keyspace.counter(t, found.slot)) for t in extra], True)
        found.current.update((t, decode_str(v)) for t, v in zip(extra, values, strict=True))

    # ---------------------------------------------------------------- hot-key replicas (docs/hot-keys.md)

    def copy_of(self, key: str) -> int | None:
        """The slot of a random replica copy of ``key`` to read, or None (the primary entry): the key is not
        replicated, or this process did not opt in (``read_replicas``)."""
        if not self.options.read_replicas:
            return None
        slots = self.registry.copies(key)
        if not slots:
            return None
        return slots[self.rng.randrange(len(slots))] if len(slots) > 1 else slots[0]

    def parse_copy(self, key: str, tags: Sequence[str], slot: int, replies: Sequence[Any]) -> Found:
        """A replica copy's read, checked against the newest version of ``key`` this process has seen: an
        older copy is ``behind`` (a miss on that copy, never served; its fill may claim the seen version)."""
        found = parse_replica(key, tags, slot, replies)
        try:
            v = int(found.entry.version)
        except ValueError:
            v = 0
        seen = self.seen
        prev = seen.get(key)
        if prev is not None and v < prev:
            found.behind = True
            found.floor = prev
            if found.entry.hit:
                self.stats.replica_behind += 1
            seen.move_to_end(key)
        else:
            found.floor = v
            if prev is None or v > prev:
                seen[key] = v
            seen.move_to_end(key)
            if len(seen) > self.options.replica_memory:
                seen.popitem(last=False)
        return found

    def decode(self, found: Found, opts: EntryOptions) -> Any:
        """The entry's value by its writer's format (``NOT_FOUND`` for a cached "not found"; a
        :class:`~.values.Frozen` with ``l1_copy``); MISSING if it does not decode (a miss: reloaded)."""
        return decode_entry(self.serializer, found.entry, opts.decode, self.copy)

    def put_from_l2(self, key: str, found: Found, value: Any, opts: EntryOptions, tags: Sequence[str],
                    since: int) -> None:
        if self.l1.max_entries <= 0:
            return
        old = self.l1.data.get(key)
        e = make_entry(monotonic(), value, found.entry.negative, opts, found.remaining,
                       [*found.entry.tags, *(t for t in tags if t not in found.entry.tags)],
                       len(found.entry.value or b""), old.delta if old is not None else 0.0,
                       found.entry.generation, self.rng)
        self.l1.put(key, e, since)

    # ---------------------------------------------------------------- reads

    def get(self, key: str, default: Any, decode: Callable[[Any], Any] | None) -> Flow:
        """``get`` past L1: L2 only, never a loader."""
        self.stats.l1_misses += 1
        check_names(key)
        opts = self.options.entry if decode is None else self.options.entry.merged(decode=decode)
        since = self.l1.begin()
        try:
            if monotonic() >= self.registry_next:
                yield from self.refresh_registry()
            if self.unverifiable:
                self.stats.l2_misses += 1
                return default
            tags = all_tags(key, (), self.registry)
            slot = self.copy_of(key) if self.registry.replicated else None
            if slot is None:
                found = parse_found(key, tags, (yield self.read_call(key, tags, False)))
            else:
                found = self.parse_copy(key, tags, slot, (yield self.read_call(key, tags, False, slot)))
            extra = found.missing()
            if extra:
                yield from self.complete(found, extra)
        except L2Unavailable:
            cur = self.fallback(key, opts)
            return default if cur is None or cur.negative else self.serve_fallback(key, cur, opts)
        value = self.decode(found, opts) if found.usable else MISSING
        if value is MISSING:
            self.stats.l2_misses += 1
            return default
        self.stats.l2_hits += 1
        self.put_from_l2(key, found, value, opts, (), since)
        return default if value is NOT_FOUND else value

    def late_hit(self, e: L1Entry, now: float, options: EntryOptions | None) -> int:
        """An L1 entry past its XFetch point: SERVE (maybe AND_REFRESH: XFetch drew an early refresh, or
        stale-while-revalidate), or MISS (past its hard TTL)."""
        if now < e.soft:  # fresh, inside the XFetch window
            e.ref = True
            self.stats.l1_hits += 1
            beta = (options or self.options.entry).early_refresh_beta
            if beta and e.delta and xfetch_due(e.delta, beta, e.soft - now, self.rng.random()):
                self.stats.early_refreshes += 1
                return SERVE_AND_REFRESH
            return SERVE
        if now < e.hard:  # stale-while-revalidate
            self.stats.stale_served += 1
            return SERVE_AND_REFRESH
        return MISS

    def get_or_load(self, key: str, loader: Callable[[], Any], ttl: Duration | None, tags: Iterable[str],
                    options: EntryOptions | None, decode: Callable[[Any], Any] | None,
                    exists_filter: str | None = None) -> Flow:
        """``get_or_load`` past L1 (the miss flow itself: one generator layer less on every miss).
        ``exists_filter``: that table's existence filter is asked first (docs/existence-filter.md)."""
        self.stats.l1_misses += 1
        opts = options or self.options.entry
        if ttl is not None or decode is not None:  # (no merge at all in the common case: no **kwargs dict)
            opts = opts.merged(ttl=ttl, decode=decode)
        if exists_filter is not None:
            return self.filtered_miss(key, loader, opts, check_names(key, tags), exists_filter)
        return self.miss(key, loader, opts, check_names(key, tags))

    def filtered_miss(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str],
                      table: str) -> Flow:
        """The miss flow behind an existence filter: "definitely absent" is None at once, with no Redis
        entry read, no single flight and no loader call (nothing cached: the filter is the cache)."""
        if (yield from check(self.exists, self.stats, table, key)):
            return None
        return (yield from self.miss(key, loader, opts, tags))

    def reachable(self) -> Generator[Step, Any, bool]:
        """Does Redis answer a PING (one node or a cluster)? The listener asks before it resets L1."""
        try:
            yield call([("PING",)], True)
        except L2Unavailable:
            return False
        return True

    def bypass(self, loader: Callable[[], Any]) -> Flow:
        """Read-your-writes not satisfied in time (``ryw_on_timeout="bypass"``): the loader, uncached."""
        value = yield LOAD, loader
        return None if value is NOT_FOUND else value

    # ---------------------------------------------------------------- miss path

    def fallback(self, key: str, opts: EntryOptions) -> L1Entry | None:
        """The L1 entry fail-safe may serve now (expired ones included; invalidated ones are gone)."""
        if not opts.fail_safe:
            return None
        e = self.l1.data.get(key)
        return e if e is not None and monotonic() < e.keep else None

    def serve_fallback(self, key: str, e: L1Entry, opts: EntryOptions) -> Any:
        """Fail-safe: serve ``e`` and keep serving it for ``fail_safe_throttle`` without retrying."""
        self.stats.fail_safe += 1
        until = min(monotonic() + opts.fail_safe_throttle, e.keep)
        if until > e.hard:
            t = L1Entry(e.value, until, until, e.keep, e.tags, e.size, e.negative, e.delta, e.generation)
            self.l1.replace(key, e, t)
        return out(e)

    def miss(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str]) -> Flow:
        fallback = self.fallback(key, opts)
        if fallback is not None and self.breaker.state == "open":
            return self.serve_fallback(key, fallback, opts)  # Redis known down: do not wait for it
        timeout = opts.loader_hard_timeout
        if fallback is not None and opts.loader_soft_timeout is not None:
            timeout = opts.loader_soft_timeout
        try:
            leader, result = yield JOIN, key, loader, opts, tags, fallback is not None, timeout
        except FlightTimedOut:
            self.stats.loader_timeouts += 1  # the flight goes on and still fills the cache
            cur = self.fallback(key, opts)
            if cur is not None:
                return self.serve_fallback(key, cur, opts)
            raise TimeoutError(f"loader for {key!r} took longer than {timeout}s") from None
        except UnencodableValue:
            raise  # a programming error: no fallback hides it
        except L2Unavailable:
            cur = self.fallback(key, opts)
            if cur is not None:
                return self.serve_fallback(key, cur, opts)
            return (yield from self.load_without_l2(key, loader, opts, tags, self.l1.begin()))
        except Exception:
            cur = self.fallback(key, opts)
            if cur is not None:
                return self.serve_fallback(key, cur, opts)
            raise
        if leader:  # an entry that came back from L2 already stale gets its refresh now
            e = self.l1.data.get(key)
            if e is not None and e.soft <= monotonic() < e.hard:
                yield REFRESH, key, loader, opts, tags, e.generation
        return result

    def load(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str],
             refresh_of: str | None, has_fallback: bool) -> Flow:
        """One flight: L2 (with the fill token), else the loader and a guarded fill.

        ``refresh_of`` (a background refresh): the generation of the copy being refreshed; an L2 entry
        of another generation is a refresh someone else already did and is adopted, the same one is
        reloaded. ``has_fallback``: Redis failures are raised (the caller serves its fallback) rather
        than answered by a load without L2.
        """
        if monotonic() >= self.registry_next:
            yield from self.refresh_registry()
        if self.unverifiable:
            self.stats.l2_misses += 1
            value, _ = yield from self.call_loader(loader)
            if value is not NOT_FOUND and value is not None:
                encode(self.serializer, key, value)  # what cannot be cached fails the same way everywhere
            return None if value is NOT_FOUND else value
        tag_list = all_tags(key, tags, self.registry)
        since = self.l1.begin()
        try:
            # Optimistic plain read first (a hit costs no script); the miss then takes its token, a
            # second round trip that the load it precedes dwarfs. A refresh goes straight to the token.
            found = None
            slot = self.copy_of(key) if self.registry.replicated else None
            if refresh_of is None:
                if slot is None:
                    found = parse_found(key, tag_list, (yield self.read_call(key, tag_list, False)))
                else:
                    found = self.parse_copy(key, tag_list, slot, (yield self.read_call(key, tag_list, False, slot)))
                extra = found.missing()
                if extra:
                    yield from self.complete(found, extra)
            usable = found is not None and found.usable  # computed once: it walks the tags
            if found is None or not usable:
                found = yield from self.read(key, tag_list, lease=True, slot=slot)
                usable = found.usable
        except L2Unavailable:
            if has_fallback or refresh_of is not None:
                raise
            return (yield from self.load_without_l2(key, loader, opts, tag_list, since))
        if usable and (refresh_of is None or found.entry.generation != refresh_of):
            value = self.decode(found, opts)
            if value is not MISSING:
                self.stats.l2_hits += 1
                self.put_from_l2(key, found, value, opts, tag_list, since)
                return None if value is NOT_FOUND else value
        self.stats.l2_misses += 1
        lock: tuple[str, str] | None = None
        if opts.distributed_lock:
            value, lock = yield from self.lock_or_wait(key, tag_list, opts, since)
            if value is not MISSING:
                return value
        try:
            value, delta = yield from self.call_loader(loader)
            return (yield from self.store(key, value, opts, found, tag_list, delta, since))
        finally:
            if lock is not None:
                with contextlib.suppress(L2Unavailable):  # it expires on its own
                    yield call([("EVALSHA", UNLOCK.sha, 1, lock[0], lock[1])])

    def call_loader(self, loader: Callable[[], Any]) -> Flow:
        self.stats.loader_calls += 1
        t0 = monotonic()
        try:
            value = yield LOAD, loader
        except Exception:
            self.stats.loader_errors += 1
            raise
        return value, monotonic() - t0

    def load_without_l2(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: Sequence[str],
                        since: int) -> Flow:
        """Redis is unreachable and L1 has nothing: the loader answers, L1 alone keeps it (fenced like any
        insert, dropped by the reset when the backplane reconnects)."""
        value, delta = yield from self.call_loader(loader)
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else encode(self.serializer, key, value)
        value = NOT_FOUND if negative else frozen_or(value, self.serializer, data, self.copy)
        e = make_entry(monotonic(), value, negative, opts, None, tags, len(data), delta, None, self.rng)
        self.l1.put(key, e, since)
        return None if negative else value

    def store(self, key: str, value: Any, opts: EntryOptions, found: Found, tags: list[str], delta: float,
              since: int) -> Flow:
        negative = value is NOT_FOUND or (value is None and opts.none_is_not_found)
        if negative and not opts.cache_negative:
            return None
        data = b"" if negative else encode(self.serializer, key, value)
        value = NOT_FOUND if negative else frozen_or(value, self.serializer, data, self.copy)
        ttl = jittered(opts.negative_ttl if negative else opts.ttl, opts.jitter, self.rng)
        snap = {t: found.current.get(t) or "" for t in tags}
        ttl_left: float | None
        # The copy may claim the newest version seen *before* this load (read with the token): the value loaded
        # after it reflects it. Never the process's current one, which another thread may have raised since.
        floor = found.floor if found.slot is not None else 0
        try:
            reply = (yield call([fill_command(self.keyspace, found.entry, data, negative, snap, ttl, found.slot,
                                              floor)]))[0]
            gen = fill_result(reply)
        except L2Unavailable:
            gen, ttl_left = None, None  # Redis went away after the token: L1 alone, as in load_without_l2
        else:
            if gen is None:
                self.stats.fills_refused += 1
                self.l1.remove(key)  # a newer change reached the key while we loaded: keep no copy of ours
                return None if negative else value
            self.stats.fills += 1
            self.stats.negative_fills += negative
            ttl_left = ttl
        e = make_entry(monotonic(), value, negative, opts, ttl_left, tags, len(data), delta, gen, self.rng)
        self.l1.put(key, e, since)
        return None if negative else value

    def lock_or_wait(self, key: str, tags: list[str], opts: EntryOptions, since: int) -> Flow:
        """Cross-process single flight: the lock holder loads; the others wait for its fill, at most
        ``lock_ttl`` (a holder that died stops blocking when its lock expires). Gives (value or MISSING,
        the lock taken or None)."""
        lock_key = self.keyspace.system(f"lock:{key}")
        token = f"{self.run_id}:{next(_lock_ids)}"
        acquire: list[Command] = [("SET", lock_key, token, "NX", "PX", max(1, int(opts.lock_ttl * 1000)))]
        if (yield call(acquire, True))[0]:
            return MISSING, (lock_key, token)
        deadline = monotonic() + opts.lock_ttl
        while monotonic() < deadline:
            yield SLEEP, self.options.lock_poll
            found = yield from self.read(key, tags, lease=False, slot=self.copy_of(key))  # the holder's copy, maybe
            if found.usable:
                value = self.decode(found, opts)
                if value is not MISSING:
                    self.stats.coalesced += 1
                    self.put_from_l2(key, found, value, opts, tags, since)
                    return (None if value is NOT_FOUND else value), None
            if (yield call(acquire, True))[0]:  # the holder finished without filling, or died
                return MISSING, (lock_key, token)
        return MISSING, None

    # ---------------------------------------------------------------- writes

    def set(self, key: str, value: Any, ttl: Duration | None, tags: Iterable[str],
            options: EntryOptions | None) -> Flow:
        tags = check_names(key, tags)
        opts = (options or self.options.entry).merged(ttl=ttl)
        data = encode(self.serializer, key, value)
        if monotonic() >= self.registry_next:
            yield from self.refresh_registry()
        if self.unverifiable:
            yield from self.delete(key)  # nothing may be cached, and an older copy must not survive the write
            return False
        tag_list = all_tags(key, tags, self.registry)
        since = self.l1.begin()
        try:
            found = yield from self.read(key, tag_list, lease=True)
            ttl_s = jittered(opts.ttl, opts.jitter, self.rng)
            snap = {t: found.current.get(t) or "" for t in tag_list}
            cmds = [fill_command(self.keyspace, found.entry, data, False, snap, ttl_s)]
            cmds.extend(self.invalidate_copies(key))  # the copies must not keep serving what this replaces
            replies = yield (PUBLISH, cmds, [key], [], False)
            gen = fill_result(replies[0])
        except L2Unavailable:
            self.l1.remove(key)
            return False
        if gen is None:
            self.stats.fills_refused += 1
            self.l1.remove(key)
            return False
        self.stats.fills += 1
        stored = frozen_or(value, self.serializer, data, self.copy)
        e = make_entry(monotonic(), stored, False, opts, ttl_s, tag_list, len(data), 0.0, gen, self.rng)
        self.l1.put(key, e, since, fence=True)
        return True

    def invalidate_copies(self, key: str) -> list[Command]:
        """INVALIDATE every replica copy of ``key`` (hot-key replicas), whether or not this process reads them."""
        ttl = max(1, int(self.options.tombstone_ttl * 1000))
        return [("EVALSHA", INVALIDATE.sha, 1, self.keyspace.replica(key, slot), ttl)
                for slot in self.registry.copies(key)]

    def delete(self, key: str) -> Flow:
        check_names(key)
        try:
            if monotonic() >= self.registry_next:  # which copies the key has (replicated keys change through
                yield from self.refresh_registry()   # the daemon anyway: a rule key's change tombstones them all)
            yield (PUBLISH, [("EVALSHA", INVALIDATE.sha, 1, self.keyspace.entry(key),
                              max(1, int(self.options.tombstone_ttl * 1000))), *self.invalidate_copies(key)],
                   [key], [], True)
            return True
        except L2Unavailable:
            return False
        finally:
            self.l1.remove(key)  # after Redis: a read racing the write cannot re-insert the old value

    def invalidate_tag(self, tag: str) -> Flow:
        check_name(tag, "tag")
        try:
            # Always the current rules: a registry read before replicas were configured would miss the mirrors
            # that copies filled meanwhile record (one more round trip, on a rare call).
            yield from self.refresh_registry()
            # the tag's counter and its mirror in every replica slot (hot-key replicas read those)
            yield PUBLISH, [("EVALSHA", BUMP.sha, 1, self.keyspace.counter(tag, slot))
                            for slot in (None, *self.registry.mirror_slots)], [], [tag], True
            return True
        except L2Unavailable:
            return False
        finally:
            self.l1.remove_tags([tag])

    def announce(self, keys: Sequence[str], tags: Sequence[str]) -> list[Command]:
        """PUBLISH commands for this process's change (the driver calls it with its publish lock held:
        numbers in order)."""
        if not self.options.publish:
            return []
        msgs = list(self.sequencer.messages([self.keyspace.entry(k) for k in keys], tags, "", time.time()))
        self.stats.published += len(msgs)
        return [("PUBLISH", self.keyspace.channel, m.encode()) for m in msgs]

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
                self.registry_next = -math.inf  # a truncate is a good moment to re-read the rules
        if msg.watermark:
            self.watermark.observe(msg.watermark)

    def reset_l1(self, why: str) -> None:
        """The backplane may have lost messages: nothing in L1 can be trusted to be current."""
        self.stats.l1_resets += 1
        self.l1.expire_all()
        self.registry_next = -math.inf
        log.debug("l1_reset", reason=why)

    # ---------------------------------------------------------------- read-your-writes

    def read_your_writes(self, key: str, min_position: Position | None) -> Flow:
        """True: read on (L1 dropped for ``key`` when only Redis vouched for the position). False: bypass."""
        pos = max(parse_position(min_position) if min_position is not None else 0, ambient_position())
        if not pos or self.watermark.value >= pos:
            return True
        self.stats.ryw_waits += 1
        timeout = self.options.ryw_timeout
        how = yield from self.await_position(pos, timeout)
        if how is None:
            self.stats.ryw_timeouts += 1
            if self.options.ryw_on_timeout == "raise":
                raise NotApplied(pos, self.watermark.value, timeout)
            return False
        if how == "redis":
            self.l1.remove(key)  # the backplane has not caught up: this L1 may still hold the old value
        return True

    def wait_applied(self, position: Position, timeout: float | None) -> Flow:
        pos = parse_position(position)
        return (yield from self.await_position(pos, self.options.ryw_timeout if timeout is None else timeout)) \
            is not None

    def await_position(self, pos: int, timeout: float) -> Generator[Step, Any, Satisfied]:
        """The backplane first (no Redis traffic in the common case); Redis's applied state when it is
        slow or not subscribed."""
        deadline = monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - monotonic())
            heard = yield WAIT_APPLIED, pos, min(remaining, REDIS_CHECK_EVERY)
            if heard:
                return "backplane"
            try:
                w = (yield call([("HGET", self.keyspace.applied, "watermark")], True))[0]
            except L2Unavailable:
                w = None
            if w and int(w) >= pos:
                return "redis"
            if monotonic() >= deadline:
                return None
            if heard is None:  # not listening: nothing wakes us early
                yield SLEEP, min(REDIS_CHECK_EVERY, max(0.0, deadline - monotonic()))
