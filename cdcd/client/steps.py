"""What the cache's core asks its driver to do: the only points where a flow waits for the world.

The core (:mod:`.core`) is written as generators that ``yield`` one of these and get the outcome back
(``send``) or the failure raised at the ``yield`` (``throw``), the way h11 and psycopg 3 keep one
protocol for blocking and asyncio code. A driver (:mod:`.cache` with threads, :mod:`.aio` with
asyncio) performs each step with its own I/O and concurrency primitives and nothing else, so a
rule of the cache is written once and both drivers obey it.

A step is a plain tuple, its kind first: an L2 hit with L1 off costs one or two steps, and a tuple is
built about five times faster than an object with slots (BENCHMARKS.md section 25). The kinds:

``(CALL, cmds, checked)``
    Send ``cmds`` to Redis in one round trip; the replies (error replies as exceptions; with
    ``checked``, raised as ``L2Unavailable``). Raises ``L2Unavailable`` at the ``yield``.
``(PUBLISH, cmds, keys, tags, checked)``
    A ``CALL`` of ``cmds`` followed by this process's backplane messages for ``keys`` and ``tags``,
    numbered and sent under the driver's publish lock (so they reach Redis in sequence order).
``(LOAD, loader)``
    Call the application's loader; its value (awaited if it is awaitable, for asyncio), or its error.
``(SLEEP, seconds)``
``(WAIT_APPLIED, position, timeout)``
    Wait (at most ``timeout``) for the backplane's watermark to reach ``position``: True/False, or
    None at once when the listener is not subscribed (nothing would arrive).
``(JOIN, key, loader, opts, tags, has_fallback, timeout)``
    Single flight: join the key's load in this process, or start it (running :meth:`CacheCore.load`);
    wait at most ``timeout``. Gives ``(leader, value)``; raises the load's error, or
    :class:`FlightTimedOut` (the load goes on and still fills the cache).
``(REFRESH, key, loader, opts, tags, refresh_of)``
    Start one background refresh of ``key`` unless a load of it is in flight; do not wait for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

from .link import Command

R = TypeVar("R")

CALL = "redis call"
PUBLISH = "publish"
LOAD = "load"
SLEEP = "sleep"
WAIT_APPLIED = "wait applied"
JOIN = "join"
REFRESH = "refresh"

Step = tuple[Any, ...]


def call(cmds: Sequence[Command], checked: bool = False) -> Step:
    """A ``CALL`` step (the hot reads build theirs inline)."""
    return CALL, cmds, checked


class FlightTimedOut(Exception):
    """Raised at a ``JOIN`` whose wait ran out (not the loader's own ``TimeoutError``)."""


def run(flow: Generator[Any, Any, R], do: Callable[[Any], Any], link: Any = None) -> R:
    """Drive ``flow`` to its end with blocking ``do(step)`` (a ``CALL`` goes straight to ``link``: the
    most common step costs no dispatch). The outcome is sent back in, an exception (any, cancellation
    included) raised at the ``yield`` so the flow's ``except`` and ``finally`` run."""
    send = flow.send
    try:
        step = send(None)
        while True:
            try:
                if step[0] is not CALL:
                    reply = do(step)
                elif step[2]:
                    reply = link.call_checked(step[1])
                else:
                    reply = link.call(step[1])
            except BaseException as exc:
                step = flow.throw(exc)
            else:
                step = send(reply)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def arun(flow: Generator[Any, Any, R], do: Callable[[Any], Awaitable[Any]], link: Any = None) -> R:
    """:func:`run` with an asyncio ``do`` and link: the one place the flows meet ``await``."""
    send = flow.send
    try:
        step = send(None)
        while True:
            try:
                if step[0] is CALL:
                    reply = await (link.call_checked(step[1]) if step[2] else link.call(step[1]))
                else:
                    reply = await do(step)
            except BaseException as exc:
                step = flow.throw(exc)
            else:
                step = send(reply)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
