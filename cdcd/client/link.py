"""Talking to Redis: batches of commands in one round trip, on the cache's own connections.

Why not a plain ``redis.Redis``: its defaults retry a failed call up to ten times with backoff
(seconds of waiting on a dead Redis, where the cache wants one bounded timeout and then the
circuit breaker), and each call takes the pool lock and polls the socket for stray data, which
is a third of an L2 hit's client time on loopback. So the cache makes its own connections
from the application's pool settings (host, TLS, auth, db...) with its own timeouts and no
retries, keeps idle ones in a deque (atomic push/pop, no lock), and pipelines every batch:
entry, its TTL and its tag counters in one round trip.

A connection that fails is closed, never reused (no half-read replies can leak into the next
call). A reused idle connection that fails with a connection error (Redis restarted, idle
timeout) is retried once on a fresh one and the other idle ones are dropped. Every batch is
safe to repeat: reads and lease creation are idempotent, a repeated fill is refused by the
guard, a repeated invalidation or tag bump invalidates once more, and a repeated backplane
message has a sequence number subscribers already saw.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cdcd.keyspace import SCRIPTS, Script

from .breaker import CircuitBreaker
from .stats import Stats

Command = tuple[Any, ...]

# Release the cross-process load lock only if we still hold it.
UNLOCK = Script("client_unlock", "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                                 "return redis.call('DEL', KEYS[1]) end return 0")
CLIENT_SCRIPTS: tuple[Script, ...] = (*SCRIPTS.values(), UNLOCK)
LOAD_SCRIPTS: list[Command] = [("SCRIPT", "LOAD", s.source) for s in CLIENT_SCRIPTS]

_FAILURES = (RedisConnectionError, RedisTimeoutError, OSError)


class L2Unavailable(Exception):
    """Redis is down, the breaker is open, or Redis refused the command: callers degrade to L1 + loader."""


def connection_settings(pool: Any, timeout: float, connect_timeout: float, retry: Any) -> tuple[Any, dict[str, Any]]:
    """The pool's connection class and arguments with the cache's timeouts and no retries."""
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=connect_timeout, retry=retry,
                  health_check_interval=0)
    return pool.connection_class, kwargs


def _pack_py(cmds: Sequence[Command]) -> bytes:
    out: list[bytes] = []
    add = out.append
    for cmd in cmds:
        add(b"*%d\r\n" % len(cmd))
        for a in cmd:
            b = a if isinstance(a, bytes) else (a.encode() if isinstance(a, str) else str(a).encode())
            add(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def _find_hiredis_pack() -> Callable[[Command], bytes] | None:
    """hiredis (optional, usually installed with redis[hiredis]) packs in C."""
    try:
        from hiredis import pack_command
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return pack_command


_hiredis_pack = _find_hiredis_pack()


def pack(cmds: Sequence[Command]) -> bytes:
    """RESP for a batch of commands whose arguments are bytes, str or int (all the cache sends).

    redis-py's packer inspects every argument through several layers of Python; on an L2 hit
    that was a quarter of the client's time. hiredis's C packer when present, else one join.
    """
    if _hiredis_pack is not None:
        return b"".join([_hiredis_pack(c) for c in cmds])
    return _pack_py(cmds)


def _scripts_missing(replies: Sequence[Any]) -> bool:
    return any(isinstance(r, NoScriptError) for r in replies)


def raise_errors(replies: Sequence[Any]) -> None:
    """An error reply (WRONGTYPE: someone wrote the key outside cdcd...) makes L2 unusable for this call."""
    for r in replies:
        if isinstance(r, ResponseError):
            raise L2Unavailable(f"Redis refused the command: {r}")


class Breakered:
    """The circuit breaker and the failure accounting every link shares (one node or a cluster, sync or
    asyncio): :class:`SyncCalls` and :class:`AsyncCalls` put the one ``call`` on a subclass's ``_run``."""

    failures: tuple[type[BaseException], ...] = _FAILURES  # what counts as "Redis unavailable"

    def __init__(self, breaker: CircuitBreaker, stats: Stats) -> None:
        self.breaker = breaker
        self.stats = stats

    def _failed(self, exc: BaseException) -> L2Unavailable:
        """Count a failed call (it may open the breaker); the error to raise."""
        self.stats.redis_errors += 1
        if self.breaker.failure():
            self.stats.breaker_open += 1
        return L2Unavailable(f"{type(exc).__name__}: {exc}")


class SyncCalls(Breakered):
    """``call`` and ``call_checked`` over a blocking ``_run`` (one batch, one round trip)."""

    def _run(self, cmds: Sequence[Command]) -> list[Any]:
        raise NotImplementedError

    def _load_scripts(self) -> None:
        self._run(LOAD_SCRIPTS)

    def call(self, cmds: Sequence[Command]) -> list[Any]:
        """Replies in order; error replies are returned as exceptions. Raises :class:`L2Unavailable`."""
        if not self.breaker.allow():
            raise L2Unavailable("circuit breaker open")
        try:
            out = self._run(cmds)
            if _scripts_missing(out):  # Redis restarted or failed over: load and repeat (see module doc)
                self._load_scripts()
                out = self._run(cmds)
        except self.failures as exc:
            raise self._failed(exc) from exc
        self.breaker.success()
        return out

    def call_checked(self, cmds: Sequence[Command]) -> list[Any]:
        out = self.call(cmds)
        raise_errors(out)
        return out


class AsyncCalls(Breakered):
    """:class:`SyncCalls` over an asyncio ``_run``."""

    async def _run(self, cmds: Sequence[Command]) -> list[Any]:
        raise NotImplementedError

    async def _load_scripts(self) -> None:
        await self._run(LOAD_SCRIPTS)

    async def call(self, cmds: Sequence[Command]) -> list[Any]:
        if not self.breaker.allow():
            raise L2Unavailable("circuit breaker open")
        try:
            out = await self._run(cmds)
            if _scripts_missing(out):
                await self._load_scripts()
                out = await self._run(cmds)
        except self.failures as exc:
            raise self._failed(exc) from exc
        self.breaker.success()
        return out

    async def call_checked(self, cmds: Sequence[Command]) -> list[Any]:
        out = await self.call(cmds)
        raise_errors(out)
        return out


class _LinkBase(Breakered):
    """What the sync and async single-node links share: connection settings without retries and the idle
    deque. Each subclass only does the socket I/O."""

    def __init__(self, pool: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker, stats: Stats,
                 no_retry: Any) -> None:
        super().__init__(breaker, stats)
        self.connection_class, self.connection_kwargs = connection_settings(pool, timeout, connect_timeout, no_retry)
        self._idle: collections.deque[Any] = collections.deque()

    def new_connection(self) -> Any:
        return self.connection_class(**self.connection_kwargs)

    def subscription(self, channel: str) -> tuple[Any, str]:
        """A new connection for the backplane listener, and its subscribe verb (see also ``ClusterLink``)."""
        return self.new_connection(), "SUBSCRIBE"

    def _drain(self) -> Iterator[Any]:
        """The idle connections, each taken out (other threads may be taking them too)."""
        while True:
            try:
                yield self._idle.pop()
            except IndexError:
                return


class Link(_LinkBase, SyncCalls):
    """Sync command batches with a breaker. Thread-safe."""

    def __init__(self, pool: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker,
                 stats: Stats) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__(pool, timeout, connect_timeout, breaker, stats, Retry(NoBackoff(), 0))

    def _run(self, cmds: Sequence[Command]) -> list[Any]:
        try:  # an idle connection (it may have died since), or a new one
            conn, reused = self._idle.pop(), True
        except IndexError:
            conn, reused = self.new_connection(), False
        try:
            out = self._exchange(conn, cmds)
        except RedisConnectionError:
            conn.disconnect()
            if not reused:
                raise
            self.close()  # its siblings most likely died with it
            conn = self.new_connection()
            try:
                out = self._exchange(conn, cmds)
            except BaseException:
                conn.disconnect()
                raise
        except BaseException:
            conn.disconnect()
            raise
        self._idle.append(conn)
        return out

    @staticmethod
    def _exchange(conn: Any, cmds: Sequence[Command]) -> list[Any]:
        conn.send_packed_command([pack(cmds)], check_health=False)
        out: list[Any] = []
        for _ in cmds:
            try:
                out.append(conn.read_response())
            except ResponseError as exc:  # an error reply: the connection is still in step
                out.append(exc)
        return out

    def close(self) -> None:
        for conn in self._drain():
            with contextlib.suppress(Exception):  # closing a dead socket may fail: nothing to do
                conn.disconnect()


class AsyncLink(_LinkBase, AsyncCalls):
    """The same over ``redis.asyncio`` connections. A cancelled call closes its connection."""

    def __init__(self, pool: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker,
                 stats: Stats) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        super().__init__(pool, timeout, connect_timeout, breaker, stats, Retry(NoBackoff(), 0))

    async def subscription(self, channel: str) -> tuple[Any, str]:  # type: ignore[override]
        return self.new_connection(), "SUBSCRIBE"

    async def _run(self, cmds: Sequence[Command]) -> list[Any]:
        try:  # an idle connection (it may have died since), or a new one
            conn, reused = self._idle.pop(), True
        except IndexError:
            conn, reused = self.new_connection(), False
        try:
            out = await self._exchange(conn, cmds)
        except RedisConnectionError:
            await conn.disconnect(nowait=True)
            if not reused:
                raise
            await self.close()
            conn = self.new_connection()
            try:
                out = await self._exchange(conn, cmds)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._idle.append(conn)
        return out

    @staticmethod
    async def _exchange(conn: Any, cmds: Sequence[Command]) -> list[Any]:
        await conn.send_packed_command([pack(cmds)], check_health=False)
        out: list[Any] = []
        for _ in cmds:
            try:
                out.append(await conn.read_response())
            except ResponseError as exc:
                out.append(exc)
        return out

    async def close(self) -> None:
        for conn in self._drain():
            with contextlib.suppress(Exception):  # closing a dead socket may fail
                await conn.disconnect(nowait=True)
