"""Text-format Postgres values -> Python values, by type OID.

pgoutput (protocol 1) sends column values in their text output form. The
replication session pins ``DateStyle=ISO`` and ``TimeZone=UTC`` so the formats
parsed here are the only ones that can arrive. The Debezium source decodes to
the same Python types, so one row renders the same cache key from either source.
A value whose type we do not know passes through as its text form.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

Converter = Callable[[str], Any]


def _bool(s: str) -> bool:
    return s == "t"


def _bytea(s: str) -> bytes | str:
    if s.startswith("\\x"):
        return bytes.fromhex(s[2:])
    return s  # escape format: only with bytea_output=escape, which the session does not set


def _parse_timestamp(s: str) -> datetime | str:
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        return s  # 'infinity', '-infinity', BC dates: keep the text


def _last_one(parse: Converter) -> Converter:
    """``parse`` remembering its last text and result: the rows of one transaction usually carry the same
    ``now()`` (an ``updated_at``), so most parses of a batch are of the text just parsed. The value is
    immutable, so rows may share it; one (text, value) pair swapped whole, so threads cannot mix them."""
    last: list[tuple[str | None, Any]] = [(None, None)]

    def conv(s: str) -> Any:
        text, value = last[0]
        if s == text:
            return value
        value = parse(s)
        last[0] = (s, value)
        return value

    return conv


_timestamp = _last_one(_parse_timestamp)
_timestamptz = _last_one(_parse_timestamp)


def _date(s: str) -> date | str:
    try:
        return date.fromisoformat(s)
    except ValueError:
        return s


def _numeric(s: str) -> Decimal:
    return Decimal(s)  # 'NaN' and 'Infinity' are valid Decimals too


def _uuid(s: str) -> str:
    return s.lower()


CONVERTERS: dict[int, Converter] = {
    16: _bool,  # bool
    17: _bytea,  # bytea
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    26: int,  # oid
    114: json.loads,  # json
    3802: json.loads,  # jsonb
    700: float,  # float4
    701: float,  # float8
    1700: _numeric,  # numeric
    1082: _date,  # date
    1114: _timestamp,  # timestamp
    1184: _timestamptz,  # timestamptz
    2950: _uuid,  # uuid
    # text-like types (25 text, 1043 varchar, 1042 bpchar, 19 name, 18 char) and
    # everything unknown pass through as str.
}


def converter(type_oid: int) -> Converter | None:
    """None means: keep the text as it is."""
    return CONVERTERS.get(type_oid)


def convert(type_oid: int, text: str) -> Any:
    conv = CONVERTERS.get(type_oid)
    if conv is None:
        return text
    try:
        return conv(text)
    except (ValueError, ArithmeticError):
        return text
