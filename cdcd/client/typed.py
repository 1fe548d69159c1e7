"""The default value format: msgpack with extension types, so every tier returns what was stored.

JSON (the old default, with ``default=str``) turned a ``datetime``, ``Decimal`` or ``UUID`` into a
``str`` in every process but the one that loaded it, and refused ``set``/``bytes``: the type a caller
got depended on which tier answered. This format keeps the type of every value people cache from a
database, nested at any depth:

=========================  ==================================================================
native msgpack             None, bool, int (64-bit), float (nan, inf and -0.0 exactly), str,
                           bytes, list, dict (any hashable keys: int, tuple, ... not only str)
extension types            int beyond 64 bits, tuple, set, frozenset, Decimal (its
                           exponent too: ``12.50`` stays ``12.50``), datetime, date, time (naive
                           or aware; a ``ZoneInfo`` comes back as the same zone, any other tzinfo
                           as the equal fixed offset), timedelta, UUID
registered types           anything else, by :meth:`TypedSerializer.register` (pydantic models,
                           dataclasses...): encoded as a builtin value, rebuilt on read
=========================  ==================================================================

The one exception: msgpack writes a ``bytearray`` or ``memoryview`` as binary before any hook sees
it, so it comes back as the equal ``bytes``. Everything else, subclasses of the above included (an
``IntEnum``, a ``defaultdict``), is refused with a ``TypeError`` naming the type, at ``set``/fill
time: a value never silently changes type.

Every value starts with a two-byte header, ``0xC1`` and a format version. ``0xC1`` is never used by
msgpack and never starts UTF-8 text, so a JSON entry (the daemon's projections, or a value an older
client wrote) can never be mistaken for this format; a header this code does not know (a newer
format) fails to decode, which the cache treats as a miss and reloads, never as garbage.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import struct
import threading
import uuid
from collections.abc import Callable
from typing import Any

import msgpack

HEADER = b"\xc1\x01"
"""``0xC1`` (msgpack's one unused byte, invalid as a UTF-8 start) + format version 1."""

# Extension codes 0-63 belong to cdcd; 64-127 are for registered types.
_BIGINT, _TUPLE, _SET, _FROZENSET, _DECIMAL = 1, 2, 3, 4, 6  # 5: reserved
_DATETIME, _DATE, _TIME, _TIMEDELTA, _UUID = 7, 8, 9, 10, 11
FIRST_USER_CODE, LAST_USER_CODE = 64, 127

_TD = struct.Struct("<iII")  # timedelta: days, seconds, microseconds (normalized ranges)
_ExtType = msgpack.ExtType
_new_tuple = tuple.__new__
_fromiso = _dt.datetime.fromisoformat


def _ext(code: int, data: bytes) -> Any:
    """``ExtType(code, data)`` without its Python-level argument checks (a third of an extension's cost)."""
    return _new_tuple(_ExtType, (code, data))


def _uuid(b: bytes) -> uuid.UUID:
    """``UUID(bytes=b)`` without its argument parsing (twice as fast; the same object)."""
    u = object.__new__(uuid.UUID)
    object.__setattr__(u, "int", int.from_bytes(b))
    object.__setattr__(u, "is_safe", uuid.SafeUUID.unknown)
    return u


def _zone_key(tz: _dt.tzinfo | None) -> str | None:
    key = getattr(tz, "key", None)  # zoneinfo.ZoneInfo (only it is rebuilt by name)
    return key if isinstance(key, str) and type(tz).__name__ == "ZoneInfo" else None


def _enc_datetime(o: _dt.datetime) -> bytes:
    key = _zone_key(o.tzinfo)
    return (o.isoformat() + "[" + key + "]" if key else o.isoformat()).encode()


def _dec_datetime(b: bytes) -> _dt.datetime:
    if b[-1] != 93:  # no "[zone]"
        return _fromiso(b.decode())
    from zoneinfo import ZoneInfo

    s, key = b[:-1].decode().split("[", 1)
    return _fromiso(s).astimezone(ZoneInfo(key))  # the instant, in its zone (fold too)


def _enc_time(o: _dt.time) -> bytes:
    key = _zone_key(o.tzinfo)
    return (o.replace(tzinfo=None).isoformat() + "[" + key + "]" if key else o.isoformat()).encode()


def _dec_time(b: bytes) -> _dt.time:
    s = b.decode()
    if s.endswith("]"):
        s, key = s[:-1].split("[", 1)
        from zoneinfo import ZoneInfo

        return _dt.time.fromisoformat(s).replace(tzinfo=ZoneInfo(key))
    return _dt.time.fromisoformat(s)


class TypedSerializer:
    """The default :class:`~cdcd.client.Serializer`: msgpack with extension types (see the module docstring).

    Thread-safe (no shared packer). ``register`` types before the cache is shared between threads.
    """

    __slots__ = ("_by_code", "_by_type", "_decoders", "_default", "_encoders", "_ext_hook", "_local")

    def __init__(self) -> None:
        pack = self._pack_inner
        unpack = self._unpack
        self._encoders: dict[type, Callable[[Any], Any]] = {
            int: self._bigint,
            tuple: lambda o: _ext(_TUPLE, pack(list(o))),
            set: lambda o: _ext(_SET, pack(list(o))),
            frozenset: lambda o: _ext(_FROZENSET, pack(list(o))),
            decimal.Decimal: lambda o: _ext(_DECIMAL, str(o).encode()),
            _dt.datetime: lambda o: _ext(_DATETIME, _enc_datetime(o)),
            _dt.date: lambda o: _ext(_DATE, o.isoformat().encode()),
            _dt.time: lambda o: _ext(_TIME, _enc_time(o)),
            _dt.timedelta: lambda o: _ext(_TIMEDELTA, _TD.pack(o.days, o.seconds, o.microseconds)),
            uuid.UUID: lambda o: _ext(_UUID, o.bytes),
        }
        self._decoders: dict[int, Callable[[bytes], Any]] = {
            _BIGINT: lambda b: int(b),
            _TUPLE: lambda b: tuple(unpack(b)),
            _SET: lambda b: set(unpack(b)),
            _FROZENSET: lambda b: frozenset(unpack(b)),
            _DECIMAL: lambda b: decimal.Decimal(b.decode()),
            _DATETIME: _dec_datetime,
            _DATE: lambda b: _dt.date.fromisoformat(b.decode()),
            _TIME: _dec_time,
            _TIMEDELTA: lambda b: _dt.timedelta(*_TD.unpack(b)),
            _UUID: _uuid,
        }
        self._by_type: dict[type, tuple[int, Callable[[Any], Any]]] = {}
        self._by_code: dict[int, Callable[[Any], Any]] = {}
        self._default = self._encode_other
        self._local = threading.local()  # one Packer per thread: building one costs more than packing a row
        decoders, by_code = self._decoders, self._by_code

        def ext_hook(code: int, data: bytes) -> Any:  # a closure: called once per extension value, keep it short
            dec = decoders.get(code)
            if dec is not None:
                return dec(data)
            user = by_code.get(code)
            if user is not None:
                return user(unpack(data))
            raise ValueError(f"unknown extension type {code} (a type registered by the writer but not here?)")

        self._ext_hook = ext_hook

    # ------------------------------------------------------------------ extension

    def register(self, cls: type, code: int, to_builtin: Callable[[Any], Any],
                 from_builtin: Callable[[Any], Any]) -> TypedSerializer:
        """Store instances of ``cls`` (and its subclasses) as ``to_builtin(obj)`` under extension ``code``
        (64-127), rebuilt with ``from_builtin`` on read. The builtin form may hold any type this
        serializer handles (a datetime inside a model's dict stays a datetime)::

            ser = TypedSerializer().register(User, 64, lambda u: u.model_dump(), User.model_validate)
            ser.register(Point, 65, dataclasses.astuple, lambda t: Point(*t))

        Every process that reads these keys must register the same codes (an unknown code is a miss).
        Returns the serializer, so registrations chain.
        """
        if not FIRST_USER_CODE <= code <= LAST_USER_CODE:
            raise ValueError(f"extension code {code} outside {FIRST_USER_CODE}-{LAST_USER_CODE}")
        if code in self._by_code:
            raise ValueError(f"extension code {code} is already registered")
        self._by_type[cls] = (code, to_builtin)
        self._by_code[code] = from_builtin
        return self

    # ------------------------------------------------------------------ Serializer

    def dumps(self, value: Any) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = self._packer()
        try:
            return HEADER + packer.pack(value)  # type: ignore[no-any-return]
        except BaseException:
            packer.reset()  # a failed pack may leave a partial buffer
            raise

    def loads(self, data: bytes) -> Any:
        if data[:2] != HEADER:
            raise ValueError("not cdcd's typed format (JSON from an older client, or a newer format)")
        return self._unpack(data[2:])

    # ------------------------------------------------------------------ internals

    def _packer(self) -> Any:
        return msgpack.Packer(default=self._default, use_bin_type=True, strict_types=True, datetime=False)

    def _pack_inner(self, value: Any) -> bytes:
        """Extension payloads (a tuple's items...): packed while the thread's packer is busy, so a new one."""
        return self._packer().pack(value)  # type: ignore[no-any-return]

    def _unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext_hook, raw=False, strict_map_key=False, use_list=True)

    @staticmethod
    def _bigint(o: int) -> Any:
        return _ext(_BIGINT, str(o).encode())

    def _encode_other(self, o: Any) -> Any:
        t = type(o)
        enc = self._encoders.get(t)
        if enc is not None:
            return enc(o)
        if self._by_type:
            for base in t.__mro__:
                reg = self._by_type.get(base)
                if reg is not None:
                    return _ext(reg[0], self._pack_inner(reg[1](o)))
        raise TypeError(f"cannot cache a value of type {t.__module__}.{t.__qualname__}: the serializer would change "
                        f"it (register it with TypedSerializer.register, or convert it first)")
