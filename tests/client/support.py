"""Helpers for the client tests (imported by conftest and by the tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from cdcd.backplane import Message, Sequencer
from cdcd.client.typed import HEADER, TypedSerializer
from cdcd.keyspace import SCRIPTS, Keyspace, run_script

_TYPED = TypedSerializer()


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
