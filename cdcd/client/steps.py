"""What the cache's core asks its driver to do: the only points where a flow waits for the world.

The core (:mod:`.core`) is written as generators that ``yield`` one of these and get the outcome back
(``send``) or the failure raised at the ``yield`` (``throw``), the way h11 and psycopg 3 keep one
protocol for blocking and asyncio code. A driver (:mod:`.cache` with threads, :mod:`.aio` with
asyncio) performs each step with its own I/O and concurrency primitives and nothing else, so a
rule of the cache is written once and both drivers obey it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

from .link import Command
from .options import EntryOptions

R = TypeVar("R")


class Call:
    """Send ``cmds`` to Redis in one round trip; the replies (error replies as exceptions; with
    ``checked``, raised as ``L2Unavailable``). Raises ``L2Unavailable`` at the ``yield``."""

    __slots__ = ("checked", "cmds")

    def __init__(self, cmds: Sequence[Command], checked: bool = False) -> None:
        self.cmds, self.checked = cmds, checked


class Publish:
    """:class:`Call` ``cmds`` followed by this process's backplane messages for ``keys`` and ``tags``,
    numbered and sent under the driver's publish lock (so they reach Redis in sequence order)."""

    __slots__ = ("checked", "cmds", "keys", "tags")

    def __init__(self, cmds: Sequence[Command], keys: Sequence[str], tags: Sequence[str], checked: bool) -> None:
        self.cmds, self.keys, self.tags, self.checked = cmds, keys, tags, checked


class Load:
    """Call the application's loader; its value (awaited if it is awaitable, for asyncio), or its error."""

    __slots__ = ("loader",)

    def __init__(self, loader: Callable[[], Any]) -> None:
        self.loader = loader


class Sleep:
    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class WaitApplied:
    """Wait (at most ``timeout``) for the backplane's watermark to reach ``position``: True/False, or
    None at once when the listener is not subscribed (nothing would arrive)."""

    __slots__ = ("position", "timeout")

    def __init__(self, position: int, timeout: float) -> None:
        self.position, self.timeout = position, timeout


class Join:
    """Single flight: join the key's load in this process, or start it (running :meth:`CacheCore.load`);
    wait at most ``timeout``. Gives ``(leader, value)``; raises the load's error, or
    :class:`FlightTimedOut` (the load goes on and still fills the cache)."""

    __slots__ = ("has_fallback", "key", "loader", "opts", "tags", "timeout")

    def __init__(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str], has_fallback: bool,
                 timeout: float | None) -> None:
        self.key, self.loader, self.opts, self.tags = key, loader, opts, tags
        self.has_fallback, self.timeout = has_fallback, timeout


class Refresh:
    """Start one background refresh of ``key`` unless a load of it is in flight; do not wait for it."""

    __slots__ = ("key", "loader", "opts", "refresh_of", "tags")

    def __init__(self, key: str, loader: Callable[[], Any], opts: EntryOptions, tags: list[str],
                 refresh_of: str | None) -> None:
        self.key, self.loader, self.opts, self.tags, self.refresh_of = key, loader, opts, tags, refresh_of


Step = Call | Publish | Load | Sleep | WaitApplied | Join | Refresh


class FlightTimedOut(Exception):
    """Raised at a :class:`Join` whose wait ran out (not the loader's own ``TimeoutError``)."""


def run(flow: Generator[Any, Any, R], do: Callable[[Any], Any], link: Any = None) -> R:
    """Drive ``flow`` to its end with blocking ``do(step)`` (a :class:`Call` goes straight to ``link``:
    the most common step costs no dispatch). The outcome is sent back in, an exception (any,
    cancellation included) raised at the ``yield`` so the flow's ``except`` and ``finally`` run."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.send(reply) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            if type(step) is Call:
                reply = link.call_checked(step.cmds) if step.checked else link.call(step.cmds)
            else:
                reply = do(step)
            error = None
        except BaseException as exc:
            reply, error = None, exc


async def arun(flow: Generator[Any, Any, R], do: Callable[[Any], Awaitable[Any]], link: Any = None) -> R:
    """:func:`run` with an asyncio ``do`` and link: the one place the flows meet ``await``."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.send(reply) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            if type(step) is Call:
                reply = await (link.call_checked(step.cmds) if step.checked else link.call(step.cmds))
            else:
                reply = await do(step)
            error = None
        except BaseException as exc:
            reply, error = None, exc
