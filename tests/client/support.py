"""Helpers for the client tests (imported by conftest and by the tests)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import redis

from cdcd.backplane import Message, Sequencer
from cdcd.client.typed import HEADER, TypedSerializer
from cdcd.keyspace import SCRIPTS, Keyspace, run_script

_TYPED = TypedSerializer()
T = TypeVar("T")

# For contract tests that patch the sync driver's link or module: run them against the thread driver only.
SYNC_ONLY = pytest.mark.parametrize("make_either", ["sync"], indirect=True)


class FakeDaemon:
    """Writes like the daemon: versioned APPLY, BUMP_TAG, then one backplane message per batch."""

    def __init__(self, client: redis.Redis, ks: Keyspace) -> None:
        self.r, self.ks = client, ks
        self.seq = Sequencer("cdcd")
        self.version = 1000

    def apply(self, key: str, value: bytes | None = None, *, publish: bool = True, ttl_ms: int = 60_000,
              tagsnap: str = "") -> int:
        self.version += 1
        res = run_script(self.r, SCRIPTS["apply"], [self.ks.entry(key)],
                         [self.version, "t" if value is None else "v", ttl_ms, value or b"", tagsnap])
        if publish:
            self.publish(keys=[key])
        return int(res)  # type: ignore[call-overload]

    def bump(self, tag: str, *, publish: bool = True) -> str:
        new = run_script(self.r, SCRIPTS["bump_tag"], [self.ks.tag(tag)], [])
        if publish:
            self.publish(tags=[tag])
        return new.decode() if isinstance(new, bytes) else str(new)

    def publish(self, keys: list[str] = (), tags: list[str] = (), seq: int | None = None,  # type: ignore[assignment]
                run: str | None = None) -> None:
        if seq is None:
            self.seq.seq += 1
            seq = self.seq.seq
        msg = Message("cdcd", run or self.seq.run, seq, str(self.version), [self.ks.entry(k) for k in keys],
                      list(tags), time.time())
        self.r.publish(self.ks.channel, msg.encode())


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "") -> float:
    """Poll ``pred`` until true; returns the seconds it took (fails the test on timeout)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(0.002)
    return time.monotonic() - t0


def fields(client: redis.Redis, key: str) -> dict[str, Any]:
    """An entry's fields as text; an application's value (``d`` in the client's typed format) decoded."""
    raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    return {k.decode(): _value(v) if k == b"d" and v[:2] == HEADER else v.decode() for k, v in raw.items()}


def _value(data: bytes) -> Any:
    try:
        return _TYPED.loads(data)
    except ValueError:  # a type registered by the test's own serializer: the raw bytes
        return data


entry = fields


class AsyncDriven:
    """An :class:`~cdcd.client.AsyncCache` used like a sync ``Cache``, so one contract test runs against both
    drivers. Its event loop runs in a thread of its own; each call is submitted to it and waited for.
    A test's (blocking) loader runs through ``asyncio.to_thread``: it blocks its own load, not the loop,
    as a blocking loader blocks only its own thread under the sync driver. Everything else (``l1``,
    ``stats``, ``breaker``, ``sequencer``...) is the async cache's own."""

    def __init__(self, cache: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.cache, self._loop = cache, loop

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def get(self, key: str, default: Any = None, **kw: Any) -> Any:
        return self._wait(self.cache.get(key, default, **kw))

    def get_or_load(self, key: str, loader: Callable[[], Any], **kw: Any) -> Any:
        async def in_a_thread() -> Any:
            return await asyncio.to_thread(loader)

        return self._wait(self.cache.get_or_load(key, in_a_thread, **kw))

    def set(self, key: str, value: Any, **kw: Any) -> bool:
        return self._wait(self.cache.set(key, value, **kw))  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        return self._wait(self.cache.delete(key))  # type: ignore[no-any-return]

    def invalidate_tag(self, tag: str) -> bool:
        return self._wait(self.cache.invalidate_tag(tag))  # type: ignore[no-any-return]

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        if not timeout:  # asyncio.wait_for(..., 0) would cancel even an already-set event's wait
            return bool(self.cache.connected.is_set())
        return self._wait(self.cache.wait_subscribed(timeout))  # type: ignore[no-any-return]

    def close(self) -> None:
        self._wait(self.cache.close())


class LoopThread:
    """An event loop in a daemon thread, for :class:`AsyncDriven` caches."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
