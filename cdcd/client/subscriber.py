"""The backplane listener: keeps L1 in step with the daemon and with other processes.

Messages name keys (full Redis keys) and tags whose values changed; the listener drops those
from L1 (and every entry carrying such a tag). Redis pub/sub loses messages while a subscriber
is disconnected and says nothing about it, so every message carries ``(origin, run, seq)`` and L1
is reset (every entry expired; kept only as a fail-safe fallback) when the listener cannot be
sure it saw everything:

* on every (re)subscription: messages may have been published while it was not listening;
* on a gap in a run's sequence numbers;
* on the first message of a daemon run when another daemon run was already heard since the
  subscription (a daemon restarted: it may have published before we heard of it).

The first run of a daemon heard after subscribing, and any application run new to us, are not
reasons: everything before the subscription is covered by its reset. A repeated or older
sequence number (a publish retried after a lost reply) is not a gap either.

A silent connection (a network partition, no RST) is noticed by PINGs every
``backplane_ping`` seconds: no reply within ``2 * backplane_ping + redis_timeout`` counts as a
lost connection. When the subscription is lost while Redis itself still answers, L1 is reset at
once (the daemon may be publishing what we now miss); when Redis is down, nothing can change or
be announced, so L1 keeps serving until the reset at re-subscription.

**Staleness bound.** While connected, an L1 copy lags a change by the backplane latency (the
daemon publishes after Redis holds the change; milliseconds). If the listener is cut off, the
lag is at most the detection time above; if it cannot run at all, ``l1_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Generator
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from cdcd.backplane import Message

from . import steps
from ._log import log

if TYPE_CHECKING:
    from cdcd.keyspace import Keyspace

    from .cluster_link import AsyncClusterLink, ClusterLink
    from .l1 import L1
    from .link import AsyncLink, Link
    from .options import CacheOptions
    from .stats import Stats

MAX_RUNS = 10_000
# classic pub/sub, and Redis 7 sharded pub/sub (SSUBSCRIBE on Redis Cluster: docs/redis-cluster.md)
_SUBSCRIBED = (b"subscribe", "subscribe", b"ssubscribe", "ssubscribe")
_MESSAGE = (b"message", "message", b"smessage", "smessage")
_DROPPED = (b"sunsubscribe", "sunsubscribe")
PURGE_EVERY = 30.0  # seconds between sweeps of entries past their fail-safe window
POLL = 0.2


class Listened(Protocol):
    """What a listener needs of the cache it keeps in step (the core, :class:`~.core.CacheCore`): the
    listener knows nothing of the drivers, and the drivers hand it their link."""

    options: CacheOptions
    stats: Stats
    keyspace: Keyspace
    l1: L1

    @property
    def run_id(self) -> str: ...

    def reset_l1(self, why: str) -> None: ...

    def apply_message(self, msg: Message) -> None: ...

    def reachable(self) -> Generator[steps.Step, Any, bool]:
        """A flow: does Redis answer a PING (a cluster's too)?"""
        ...


class SeqTracker:
    """Per-run sequence numbers; pure logic shared by the sync and async listeners."""

    def __init__(self, own_run: str) -> None:
        self.own_run = own_run
        self.last: OrderedDict[str, int] = OrderedDict()
        self._daemon_heard = False

    def subscribed(self) -> None:
        """A (re)subscription resets L1, which covers everything published before it."""
        self.last.clear()
        self._daemon_heard = False

    def check(self, msg: Message) -> str | None:
        """None when the message follows what we saw; else why L1 must be reset."""
        if msg.run == self.own_run:
            return None
        prev = self.last.get(msg.run)
        if prev is None:
            self.last[msg.run] = msg.seq
            if len(self.last) > MAX_RUNS:
                self.last.popitem(last=False)
            if msg.origin != "cdcd":
                return None
            heard, self._daemon_heard = self._daemon_heard, True
            return f"new daemon run {msg.run}" if heard else None
        self.last.move_to_end(msg.run)
        if msg.seq <= prev:
            return None  # a repeat (retried publish) or reordered: nothing was lost
        self.last[msg.run] = msg.seq
        if msg.seq != prev + 1:
            return f"gap in run {msg.run}: seq {prev} then {msg.seq}"
        return None


# What the listener's flow asks its driver to do (``(op, arg)``; see :meth:`_Listener.session`).
Op = tuple[str, Any]


class _Listener:
    """The listener's whole flow, without I/O: (re)subscribing, decoding, sequence tracking, applying,
    pings, silence detection, backoff. The thread and the asyncio task only do its steps."""

    def __init__(self, cache: Listened) -> None:
        self.cache = cache
        self.tracker = SeqTracker(cache.run_id)
        self.ever_connected = False
        opts = cache.options
        self.ping_every = opts.backplane_ping
        self.silent_after = 2 * opts.backplane_ping + opts.redis_timeout

    def on_subscribed(self) -> None:
        if self.ever_connected:
            self.cache.stats.backplane_reconnects += 1
        self.ever_connected = True
        self.tracker.subscribed()
        self.cache.reset_l1("backplane (re)subscribed")

    def handle(self, data: bytes | str) -> None:
        cache = self.cache
        try:
            msg = Message.decode(data)
        except ValueError:
            cache.reset_l1("malformed backplane message")
            return
        if msg.run == self.tracker.own_run:
            return  # our own change: already applied locally
        cache.stats.backplane_messages += 1
        why = self.tracker.check(msg)
        if why is not None:
            if why.startswith("gap"):
                cache.stats.backplane_gaps += 1
            cache.reset_l1(why)
        cache.apply_message(msg)  # its own keys and tags are known superseded: removed, not just expired

    def on_reply(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) >= 3:
            if reply[0] in _MESSAGE:
                self.handle(reply[2])
            elif reply[0] in _DROPPED:
                # Redis Cluster unsubscribes a shard channel's listeners when its slot moves to another node
                # (resharding): from then on nothing reaches us here, so it is a lost subscription.
                raise RedisConnectionError("shard channel unsubscribed by the server (its slot moved)")

    def session(self) -> Generator[Op | steps.Step, Any, None]:
        """Listen until the driver stops. Steps: ``connect`` (a new connection for channel ``arg``, the old
        one closed; gives the subscribe verb: ``SSUBSCRIBE`` on a sharded cluster, else ``SUBSCRIBE``),
        ``send`` a command, ``read`` a reply (``arg``: at most that many seconds, else None), ``connected``
        (set or clear the driver's flag; gives whether it was set), ``pause`` for ``arg`` seconds, and a
        ``CALL`` (:mod:`.steps`: a PING, is Redis itself reachable?). Redis and socket errors are raised at
        the ``yield``."""
        cache = self.cache
        delay = 0.05
        last_purge = monotonic()
        while True:
            try:
                # a (re)subscription after a failover or a slot move is a gap like any other: L1 is reset
                verb = yield "connect", cache.keyspace.channel
                yield "send", (verb, cache.keyspace.channel)
                reply = yield "read", None
                if not (isinstance(reply, list) and reply[0] in _SUBSCRIBED):
                    raise RedisConnectionError(f"unexpected reply to {verb}: {reply!r}")
                self.on_subscribed()
                yield "connected", True
                delay = 0.05
                last_rx = last_ping = monotonic()
                while True:
                    reply = yield "read", POLL
                    if reply is not None:
                        self.on_reply(reply)
                        last_rx = monotonic()
                    now = monotonic()
                    if now - last_ping >= self.ping_every:
                        yield "send", ("PING",)
                        last_ping = now
                    if now - last_rx > self.silent_after:
                        raise RedisConnectionError(f"backplane silent for {now - last_rx:.1f}s")
                    if now - last_purge > PURGE_EVERY:
                        cache.l1.purge_dead(now)
                        last_purge = now
            except (RedisError, RedisClusterException, OSError) as exc:
                if (yield "connected", False):
                    log.debug("backplane_lost", error=str(exc))
                    if (yield from cache.reachable()):
                        cache.reset_l1(f"backplane connection lost: {exc}")
                yield "pause", delay
                delay = min(delay * 2, 2.0)
            except Exception as exc:  # a bug must not silently end the listener (and L1's invalidation)
                log.error("backplane_listener_error", error=repr(exc))
                yield "connected", False
                cache.reset_l1(f"backplane listener error: {exc!r}")
                yield "pause", delay
                delay = min(delay * 2, 2.0)



class _Stopped(BaseException):
    """Raised in the listener's flow when the thread is told to stop (a BaseException: the flow's
    error handling must not take it for a Redis failure)."""


class Subscriber(threading.Thread):
    """The sync cache's listener thread, on a connection of its own."""

    def __init__(self, cache: Listened, link: Link | ClusterLink) -> None:
        super().__init__(name="cdcd-backplane", daemon=True)
        self.link = link
        self.core = _Listener(cache)
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._conn: Any = None

    def stop(self) -> None:
        self._stopping.set()
        self.join(3)

    def run(self) -> None:
        try:
            steps.run(self.core.session(), self._do, self.link)
        except _Stopped:
            pass
        finally:
            self._close()

    def _do(self, step: Op) -> Any:
        op, arg = step
        if self._stopping.is_set():
            raise _Stopped
        conn = self._conn
        if op == "read":
            if arg is None:
                return conn.read_response(push_request=True)
            return conn.read_response(push_request=True) if conn.can_read(timeout=arg) else None
        if op == "send":
            return conn.send_command(*arg, check_health=False)
        if op == "connect":
            self._close()
            self._conn, verb = self.link.subscription(arg)
            self._conn.connect()
            return verb
        if op == "connected":
            was = self.connected.is_set()
            self.connected.set() if arg else self.connected.clear()
            return was
        return self._stopping.wait(arg)  # pause

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()


class AsyncSubscriber:
    """The asyncio cache's listener task, on a connection of its own."""

    def __init__(self, cache: Listened, link: AsyncLink | AsyncClusterLink) -> None:
        self.link = link
        self.core = _Listener(cache)
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._conn: Any = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run(), name="cdcd-backplane")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def run(self) -> None:
        """Until cancelled (:meth:`stop`)."""
        try:
            await steps.arun(self.core.session(), self._do, self.link)
        finally:
            await self._close()

    async def _do(self, step: Op) -> Any:
        op, arg = step
        conn = self._conn
        if op == "read":
            return await conn.read_response(timeout=arg, push_request=True)
        if op == "send":
            return await conn.send_command(*arg, check_health=False)
        if op == "connect":
            await self._close()
            self._conn, verb = await self.link.subscription(arg)
            await self._conn.connect()
            return verb
        if op == "connected":
            was = self.connected.is_set()
            self.connected.set() if arg else self.connected.clear()
            return was
        return await asyncio.sleep(arg)  # pause

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
