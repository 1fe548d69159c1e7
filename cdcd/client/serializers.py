"""How values become the bytes stored in the entry's ``d`` field, and back: the :class:`Serializer` protocol.

The default is :class:`cdcd.client.typed.TypedSerializer` (msgpack with extension types: every tier
returns what was stored, see docs/client-values.md). The ones here are alternatives for special cases:
JSON and plain msgpack (both lossy: dates, Decimals and UUIDs come back as strings), raw bytes. Values
the daemon writes are always JSON and are decoded by the cache, whatever the serializer. A value that
does not decode is treated as a miss and reloaded, never returned garbled; ``dumps`` should raise
``TypeError`` for a value it cannot store exactly (the cache reports it with the key).
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Serializer(Protocol):
    """Value <-> bytes. Must be thread-safe and free of side effects."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """Compact JSON; ``default=str`` so dates, Decimals and UUIDs go out as strings, like the daemon's."""

    __slots__ = ("_encode",)

    def __init__(self) -> None:
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode

    def dumps(self, value: Any) -> bytes:
        return self._encode(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    """Plain msgpack, ``default=str`` (lossy like JSON); kept for entries written with it before
    :class:`~cdcd.client.typed.TypedSerializer` became the default."""

    __slots__ = ("_packb", "_unpackb")

    def __init__(self) -> None:
        import msgpack

        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def dumps(self, value: Any) -> bytes:
        return bytes(self._packb(value, default=str, use_bin_type=True))

    def loads(self, data: bytes) -> Any:
        return self._unpackb(data, raw=False)


class RawSerializer:
    """Values are ``bytes``, stored as they are (the application serializes)."""

    __slots__ = ()

    def dumps(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"RawSerializer stores bytes, got {type(value).__name__}")
        return bytes(value)

    def loads(self, data: bytes) -> Any:
        return data
