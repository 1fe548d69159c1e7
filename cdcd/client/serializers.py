"""Value serializers. JSON by default (what the daemon writes for ``update`` rules); msgpack optional."""

from __future__ import annotations

import json
from typing import Any, Protocol


class Serializer(Protocol):
    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """Compact JSON; ``default=str`` so dates, Decimals and UUIDs round-trip as strings like the daemon's."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), default=str).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    """Smaller and faster than JSON; only for keys the daemon does not write values to (invalidate rules)."""

    def __init__(self) -> None:
        import msgpack

        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def dumps(self, value: Any) -> bytes:
        return bytes(self._packb(value, default=str))

    def loads(self, data: bytes) -> Any:
        return self._unpackb(data)
