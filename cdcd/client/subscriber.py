"""The backplane listener: keeps L1 in step with the daemon and with other processes.

Redis pub/sub loses messages while a subscriber is disconnected and says nothing
about it, so every message carries ``(origin, run, seq)``. L1 is reset (every
entry expired) when this listener cannot be sure it saw everything:

* on every (re)subscription: messages may have been published while it was not listening;
* on a gap in a run's sequence numbers;
* on the first message of a daemon run it has not seen (a daemon restarted: its
  first messages may have been published before we heard of it).

A run of an application process that is new to us is not a reason: its messages
only ever name what that process itself wrote. The daemon also publishes an
empty heartbeat every second while idle, so a lost *last* message is noticed
within about a second instead of at the next change.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError

from cdcd.backplane import Message

if TYPE_CHECKING:
    from cdcd.client.cache import Cache

MAX_RUNS = 10_000


class SeqTracker:
    """Per-run sequence numbers; pure logic shared by the sync and async listeners."""

    def __init__(self, own_run: str) -> None:
        self.own_run = own_run
        self.last: OrderedDict[str, int] = OrderedDict()

    def check(self, msg: Message) -> str | None:
        """None when the message follows what we saw; else why L1 must be reset."""
        if msg.run == self.own_run:
            return None
        prev = self.last.get(msg.run)
        self.last[msg.run] = msg.seq
        self.last.move_to_end(msg.run)
        if len(self.last) > MAX_RUNS:
            self.last.popitem(last=False)
        if prev is None:
            return f"new daemon run {msg.run}" if msg.origin == "cdcd" else None
        if msg.seq != prev + 1:
            return f"gap in run {msg.run}: seq {prev} then {msg.seq}"
        return None


class Subscriber(threading.Thread):
    def __init__(self, cache: Cache) -> None:
        super().__init__(name="cdcd-backplane", daemon=True)
        self.cache = cache
        self.tracker = SeqTracker(cache.sequencer.run)
        self.connected = threading.Event()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(3)

    def _redis_reachable(self) -> bool:
        try:
            return bool(self.cache.redis.ping())
        except (RedisError, OSError):
            return False

    def handle(self, data: bytes | str) -> None:
        cache = self.cache
        try:
            msg = Message.decode(data)
        except ValueError:
            cache.reset_l1("malformed backplane message")
            return
        if msg.run == self.tracker.own_run:
            return
        cache.stats.backplane_messages += 1
        why = self.tracker.check(msg)
        if why is not None:
            if why.startswith("gap"):
                cache.stats.backplane_gaps += 1
            cache.reset_l1(why)
            return
        cache.apply_message(msg)

    def run(self) -> None:
        delay = 0.05
        pool = self.cache.redis.connection_pool
        while not self._stopping.is_set():
            pubsub: Any = None
            try:
                # its own connection, with a health check so a silent partition is noticed within seconds
                own = redis.ConnectionPool(connection_class=pool.connection_class, **{
                    **pool.connection_kwargs, "socket_timeout": 5.0, "health_check_interval": 2})
                pubsub = redis.Redis(connection_pool=own).pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.cache.keyspace.channel)
                while not self._stopping.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self.cache.reset_l1("backplane (re)subscribed")
                        self.connected.set()
                        delay = 0.05
                    elif msg["type"] == "message":
                        self.handle(msg["data"])
            except (RedisError, OSError) as exc:
                if self.connected.is_set() and self._redis_reachable():
                    # only our subscription broke: the daemon may be publishing what we now miss
                    self.cache.reset_l1(f"backplane connection lost: {exc}")
                # Redis itself is down: nothing can change it or be announced, so L1 keeps serving
                # (fail-safe, bounded by the L1 TTL); the reset on re-subscription covers the gap.
                self.connected.clear()
                self._stopping.wait(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        pubsub.close()
