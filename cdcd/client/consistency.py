"""Read-your-writes: "not older than my commit" (docs/read-your-writes.md).

The daemon announces an *applied watermark* W on the backplane: every transaction whose commit ended
at or before source position W has been applied to Redis, and the messages that dropped L1 copies for
it were published before W was. An application captures the position of its commit
(:func:`commit_position`, ``pg_current_wal_lsn()`` read after the commit) and asks the cache to wait
until W reaches it before reading. Because the backplane is one ordered channel, by the time this
process's listener has seen W it has also applied every earlier invalidation to L1, so L1 and L2 are
both at least as new as the commit. When the watermark is learned from Redis instead (no listener, or
the backplane is slow), L1 is skipped for that read.

This module holds the pieces both caches share: positions, the watermark tracker (threads and
asyncio), the ambient "read your writes" scope and the commit-position capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

from .dbapi import afetch_row, fetch_row

Position = int | str
Satisfied = Literal["backplane", "redis"] | None

_POSITION_SQL = "SELECT pg_current_wal_lsn()::text, pg_current_xact_id_if_assigned() IS NOT NULL"
_MIN_POSITION: contextvars.ContextVar[int] = contextvars.ContextVar("cdcd_min_position", default=0)
REDIS_CHECK_EVERY = 0.05  # while waiting, how long the backplane gets before Redis is asked directly
# Scopes open in this process: a read checks its context only when some scope exists, which keeps the
# L1 hit path (hundreds of nanoseconds) free of a ContextVar lookup for apps that never use this.
ACTIVE = [0]
_active_lock = threading.Lock()


class NotApplied(TimeoutError):
    """The daemon did not apply the position in time (``ryw_on_timeout="raise"``)."""

    def __init__(self, position: int, watermark: int, timeout: float) -> None:
        super().__init__(f"cdcd has not applied position {format_position(position)} within {timeout}s "
                         f"(applied watermark {format_position(watermark)})")
        self.position, self.watermark = position, watermark


def parse_position(position: Position) -> int:
    """An LSN as ``pg_current_wal_lsn()`` prints it (``16/B374D848``), or as an integer (or its decimal
    text, as the daemon's applied state holds it)."""
    if isinstance(position, int) and not isinstance(position, bool):
        if position < 0:
            raise ValueError(f"position {position} is negative")
        return position
    if isinstance(position, str):
        text = position.strip()
        if "/" in text:
            hi, _, lo = text.partition("/")
            try:
                return (int(hi, 16) << 32) + int(lo, 16)
            except ValueError:
                pass
        elif text.isdigit():
            return int(text)
    raise ValueError(f"not a source position: {position!r} (expected an LSN like '16/B374D848' or an integer)")


def format_position(position: int) -> str:
    """The ``pg_lsn`` text of a position: what to put in a header or a session to pass it on."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def ambient_position() -> int:
    """The position the current :func:`read_your_writes` scope asks for (0: none)."""
    return _MIN_POSITION.get()


@contextlib.contextmanager
def read_your_writes(position: Position | None) -> Iterator[int]:
    """Every read through a cdcd cache in this scope (this thread, or this asyncio task and the tasks it
    starts) returns nothing older than ``position``; nested scopes keep the newest. ``None`` is a no-op,
    so a request without a position (no header) needs no branch."""
    if position is None:
        yield _MIN_POSITION.get()
        return
    p = max(parse_position(position), _MIN_POSITION.get())
    token = _MIN_POSITION.set(p)
    with _active_lock:
        ACTIVE[0] += 1
    try:
        yield p
    finally:
        _MIN_POSITION.reset(token)
        with _active_lock:
            ACTIVE[0] -= 1


class Watermark:
    """The highest applied watermark this process has seen, and the readers waiting for one.

    Fed by the backplane listener (a thread for ``Cache``, the event loop for ``AsyncCache``) after it
    applied a message's invalidations to L1; waited on by readers in threads or coroutines.
    """

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def observe(self, watermark: int | str) -> None:
        w = int(watermark) if watermark else 0
        if w <= self.value:
            return
        with self._cond:
            if w <= self.value:
                return
            self.value = w
            self._cond.notify_all()
            ready = [(loop, fut) for p, loop, fut in self._waiters if p <= w]
            self._waiters = [x for x in self._waiters if x[0] > w]
        for loop, fut in ready:
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, fut)

    def wait(self, position: int, timeout: float) -> bool:
        if self.value >= position:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.value < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    async def wait_async(self, position: int, timeout: float) -> bool:
        if self.value >= position:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self.value >= position:
                return True
            entry = (position, loop, fut)
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return self.value >= position
        finally:
            with self._cond, contextlib.suppress(ValueError):
                self._waiters.remove(entry)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# ------------------------------------------------------------------------- commit positions


def commit_position(handle: Any) -> int:
    """The position to wait for after a commit made on ``handle`` (psycopg 3, psycopg2, SQLAlchemy,
    Django or DB-API connection): the server's WAL end, read *after* the commit, so it is at or past the
    commit. Raises RuntimeError when called inside a transaction that wrote (its commit is still to
    come: a position read now would be older than it)."""
    return _checked(fetch_row(handle, _POSITION_SQL))


async def acommit_position(handle: Any) -> int:
    """:func:`commit_position` for psycopg 3 / SQLAlchemy asyncio handles."""
    return _checked(await afetch_row(handle, _POSITION_SQL))


def _checked(row: Any) -> int:
    lsn, wrote = row[0], row[1]
    if wrote:
        raise RuntimeError("commit_position() was called inside a transaction that wrote: call it after the "
                           "commit (a position read before the commit is older than the commit)")
    return parse_position(str(lsn))
