"""Debezium change events (Kafka Connect ``JsonConverter`` output) -> :class:`~cdcd.change.Transaction`.

Pure parsing, no I/O: the Kafka source feeds it record keys and values, the tests
feed it hand-written and captured events. Three things matter more than the
envelope itself:

* **The same Python values as the pgoutput source.** A row must render the same
  cache key whichever source delivered it, so every column is decoded to the
  type :mod:`cdcd.pg.pgtypes` produces: int2/4/8 -> ``int``, numeric ->
  ``Decimal`` with the column's scale (``12.50`` stays ``12.50``), float ->
  ``float``, uuid -> lower-case ``str``, timestamp -> naive ``datetime``,
  timestamptz -> aware ``datetime`` in UTC, date -> ``date``, time -> its
  Postgres text (``12:34:56.5``; pgtypes keeps time as text), json/jsonb ->
  parsed object, bytea -> ``bytes``.
* **Types come from the schema.** Debezium encodes many types as plain JSON
  numbers or strings (a timestamp is microseconds since the epoch, a precise
  decimal is base64 of the unscaled integer). Only the ``schema`` half of a
  ``schemas.enable=true`` record says which; without it the parser passes
  numbers and strings through unchanged unless the topic's options carry
  per-column *hints* (:data:`HINTS`). So cdcd wants ``schemas.enable=true``
  with ``decimal.handling.mode=precise`` (or ``string``); ``double`` loses the
  scale and cannot render ``12.50`` again.
* **Nothing is dropped silently.** Anything that cannot be parsed becomes a
  :class:`~cdcd.change.Rejected` for the dead-letter path. ``None`` is returned
  only for records that carry no change by design: delete tombstones (the
  ``d`` event before them already said everything), logical decoding messages
  of another application, Debezium heartbeats, transaction-metadata and
  schema-change records. The caller must still treat those positions as done.

One Debezium record is one Transaction: on Kafka there are no transaction
boundaries (short of the separate transaction-metadata topic), and there need
not be: a Postgres record's version (``source.sequence``: last commit LSN, then
change LSN) orders it by commit, and a record that cannot be ordered is a fence,
applied as invalidation only (:func:`sequence_version`, docs/versions.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from typing import Any, Literal

try:
    import msgspec
except ImportError:  # pragma: no cover - the kafka extra installs it; without it the json path parses
    msgspec = None  # type: ignore[assignment]

from cdcd.change import UNAVAILABLE, Change, Op, Rejected, Row, Transaction
from cdcd.pg.pgoutput import MESSAGE_PREFIX, parse_invalidation

PLACEHOLDER = "__debezium_unavailable_value"
"""Debezium's default ``unavailable.value.placeholder`` (unchanged TOASTed column)."""

VersionMode = Literal["sequence", "lsn", "binlog"]
Converter = Callable[[Any], Any]

_EPOCH = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)
_WIDE = Context(prec=2000)  # Postgres numerics have up to 1000 digits either side of the point
_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.READ, "t": Op.TRUNCATE}


class ParseError(ValueError):
    """One record is not a Debezium change event cdcd can use; becomes a Rejected."""


# ------------------------------------------------------------------------------ value converters


def _b64(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ParseError(f"expected a base64 string, got {type(v).__name__}")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParseError(f"invalid base64: {exc}") from None


def _int(v: Any) -> int:
    if type(v) is int:  # what JSON integers decode to (bool is a subclass, refused below)
        return v
    if isinstance(v, bool) or not isinstance(v, int | Decimal | float):
        raise ParseError(f"expected an integer, got {v!r}")
    i = int(v)
    if i != v:
        raise ParseError(f"expected an integer, got {v!r}")
    return i


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | Decimal | str):
        raise ParseError(f"expected a number, got {v!r}")
    try:
        return float(v)  # str: "NaN" / "Infinity" as some converters write them
    except ValueError:
        raise ParseError(f"expected a number, got {v!r}") from None


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ParseError(f"expected a boolean, got {v!r}")
    return v


def _text(v: Any) -> Any:
    return v


def _uuid(v: Any) -> str:
    if not isinstance(v, str):
        raise ParseError(f"expected a uuid string, got {v!r}")
    return v.lower()


def _json(v: Any) -> Any:
    if not isinstance(v, str):
        return v  # already structured (a converter that embeds JSON)
    try:
        return json.loads(v)
    except json.JSONDecodeError as exc:
        raise ParseError(f"json column is not JSON: {exc}") from None


def _bytes(v: Any) -> bytes:
    return _b64(v)


def _scaled(unscaled: int, scale: int) -> Decimal:
    """Exact: Decimal from a string never rounds, whatever the context precision."""
    if scale < 0:  # numeric(p, -s) (Postgres 15+): the text form has no exponent
        return Decimal(unscaled * 10 ** (-scale))
    return Decimal(f"{unscaled}E-{scale}")


def _decimal_bytes(scale: int) -> Converter:
    """``org.apache.kafka.connect.data.Decimal``: base64 big-endian two's complement of the unscaled value.

    ``JsonConverter`` with ``decimal.format=NUMERIC`` writes a JSON number instead; the
    record is parsed with ``parse_float=Decimal`` so that arrives exact and is
    brought to the column's scale.
    """

    def conv(v: Any) -> Decimal:
        if isinstance(v, str):
            return _scaled(int.from_bytes(_b64(v), "big", signed=True), scale)
        if isinstance(v, int | Decimal) and not isinstance(v, bool):
            d = Decimal(v)
            if scale >= 0 and d.is_finite():
                return d.quantize(Decimal(1).scaleb(-scale), context=_WIDE)
            return d
        raise ParseError(f"expected a Decimal (base64 or number), got {v!r}")

    return conv


def _variable_decimal(v: Any) -> Decimal:
    """``io.debezium.data.VariableScaleDecimal``: numeric without a declared scale."""
    if not isinstance(v, dict) or not isinstance(v.get("scale"), int) or "value" not in v:
        raise ParseError(f"expected {{scale, value}}, got {v!r}")
    return _scaled(int.from_bytes(_b64(v["value"]), "big", signed=True), v["scale"])


def _decimal_text(v: Any) -> Decimal:
    """``decimal.handling.mode=string`` (or a hint): the decimal's text, exact."""
    if isinstance(v, bool):
        raise ParseError(f"expected a decimal, got {v!r}")
    try:
        return Decimal(v) if isinstance(v, str | int | Decimal) else Decimal(repr(float(v)))
    except (InvalidOperation, TypeError, ValueError):
        raise ParseError(f"expected a decimal, got {v!r}") from None


def _timestamp(unit: int) -> Converter:
    """Epoch count -> naive datetime. ``unit`` is the count's ticks per microsecond (or its inverse).

    Values outside Python's years 1-9999 (Postgres ``infinity`` arrives as an extreme
    count) become the text pgtypes keeps for them.
    """

    def conv(v: Any) -> datetime | str:
        n = _int(v)
        micros = n * unit if unit > 0 else n // -unit
        try:
            return _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            return "infinity" if n > 0 else "-infinity"

    return conv


_FRACTION = re.compile(r"^(.*T\d\d:\d\d:\d\d)\.(\d+)(.*)$")


def _zoned_timestamp(v: Any) -> datetime | str:
    """``io.debezium.time.ZonedTimestamp``: ISO 8601 text (Postgres: always in UTC, ``Z``) -> aware UTC."""
    if not isinstance(v, str):
        raise ParseError(f"expected an ISO 8601 timestamp, got {v!r}")
    try:
        text = v
        m = _FRACTION.match(v) if "." in v else None
        if m and len(m.group(2)) > 6:  # nanoseconds: Python keeps microseconds (as Postgres does)
            text = f"{m.group(1)}.{m.group(2)[:6]}{m.group(3)}"
        parsed = datetime.fromisoformat(text)
    except ValueError:
        if v in ("infinity", "-infinity"):
            return v
        raise ParseError(f"not an ISO 8601 timestamp: {v!r}") from None
    if parsed.tzinfo is None:
        raise ParseError(f"zoned timestamp without a zone: {v!r}")
    return parsed.astimezone(UTC)


def _date(v: Any) -> date | str:
    n = _int(v)
    try:
        return _EPOCH_DATE + timedelta(days=n)
    except OverflowError:
        return "infinity" if n > 0 else "-infinity"


def _time(unit: int) -> Converter:
    """Time of day as Postgres prints it (``12:34:56``, ``12:34:56.5``): pgtypes keeps time as text."""

    def conv(v: Any) -> str:
        n = _int(v)
        micros = n * unit if unit > 0 else n // -unit
        secs, frac = divmod(micros, 1_000_000)
        text = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        if frac:
            text += f".{frac:06d}".rstrip("0")
        return text

    return conv


def _array(item: Converter) -> Converter:
    def conv(v: Any) -> list[Any]:
        if not isinstance(v, list):
            raise ParseError(f"expected an array, got {v!r}")
        return [None if x is None else item(x) for x in v]

    return conv


def _generic(v: Any) -> Any:
    """A value without a schema or hint: JSON types pass through as they are.

    Two exceptions make schemaless rows closer to pgoutput's: JSON fractions (parsed as
    Decimal to keep NUMERIC decimals exact) become float again, and the one struct the
    Postgres connector emits for a column, ``{scale, value}``, is a variable-scale numeric.
    """
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, dict) and set(v) == {"scale", "value"} and isinstance(v["scale"], int):
        try:
            return _variable_decimal(v)
        except ParseError:
            return v
    if isinstance(v, list):
        return [_generic(x) for x in v]
    return v


_BY_NAME: dict[str, Converter] = {
    "io.debezium.data.VariableScaleDecimal": _variable_decimal,
    "io.debezium.time.Timestamp": _timestamp(1000),  # ms
    "org.apache.kafka.connect.data.Timestamp": _timestamp(1000),
    "io.debezium.time.MicroTimestamp": _timestamp(1),
    "io.debezium.time.NanoTimestamp": _timestamp(-1000),
    "io.debezium.time.ZonedTimestamp": _zoned_timestamp,
    "io.debezium.time.Date": _date,
    "org.apache.kafka.connect.data.Date": _date,
    "io.debezium.time.Time": _time(1000),
    "org.apache.kafka.connect.data.Time": _time(1000),
    "io.debezium.time.MicroTime": _time(1),
    "io.debezium.time.NanoTime": _time(-1000),
    "io.debezium.data.Json": _json,
    "io.debezium.data.Uuid": _uuid,
    "cdcd.decimal": _decimal_text,
}

_BY_TYPE: dict[str, Converter] = {
    "int8": _int, "int16": _int, "int32": _int, "int64": _int,
    "float": _float, "float32": _float, "double": _float, "float64": _float,
    "boolean": _bool, "string": _text, "bytes": _bytes,
}


def converter_for(field_schema: Mapping[str, Any]) -> Converter | None:
    """The converter a Kafka Connect field schema calls for; None: pass the JSON value through."""
    name = field_schema.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        params = field_schema.get("parameters") or {}
        try:
            return _decimal_bytes(int(params.get("scale", 0)))
        except (TypeError, ValueError):
            raise ParseError(f"Decimal schema with a bad scale: {params!r}") from None
    if isinstance(name, str) and name in _BY_NAME:
        return _BY_NAME[name]
    ftype = field_schema.get("type")
    if ftype == "array":
        items = field_schema.get("items")
        item = converter_for(items) if isinstance(items, Mapping) else None
        return _array(item or _generic)
    if isinstance(ftype, str):
        return _BY_TYPE.get(ftype)
    return None


# ------------------------------------------------------------------------------ hints

HINTS: dict[str, dict[str, Any]] = {
    "int": {"type": "int64"},
    "float": {"type": "double"},
    "bool": {"type": "boolean"},
    "text": {"type": "string"},
    "uuid": {"type": "string", "name": "io.debezium.data.Uuid"},
    "json": {"type": "string", "name": "io.debezium.data.Json"},
    "bytea": {"type": "bytes"},
    "decimal": {"type": "string", "name": "cdcd.decimal"},
    "timestamp": {"type": "int64", "name": "io.debezium.time.MicroTimestamp"},
    "timestamp_ms": {"type": "int64", "name": "io.debezium.time.Timestamp"},
    "timestamp_ns": {"type": "int64", "name": "io.debezium.time.NanoTimestamp"},
    "timestamptz": {"type": "string", "name": "io.debezium.time.ZonedTimestamp"},
    "date": {"type": "int32", "name": "io.debezium.time.Date"},
    "time": {"type": "int64", "name": "io.debezium.time.MicroTime"},
    "time_ms": {"type": "int32", "name": "io.debezium.time.Time"},
}
"""Per-column type hints for topics whose records carry no schema (``schemas.enable=false``).

``decimal`` is a decimal written as text or a JSON number (``decimal.handling.mode=string``);
``decimal(S)`` is ``decimal.handling.mode=precise`` without a schema: base64 of the unscaled
value with scale S. ``timestamp`` is microseconds (Debezium's default for ``timestamp(6)``),
``timestamp_ms`` milliseconds (``timestamp(0..3)``), ``timestamp_ns`` nanoseconds; ``date`` is
days; ``time`` microseconds. A hint also overrides a schema (e.g. ``decimal`` on a
``string``-mode numeric so it decodes to ``Decimal``).
"""

_DECIMAL_HINT = re.compile(r"^decimal\((-?\d+)\)$")


def hint_schema(hint: str) -> dict[str, Any]:
    """A hint as the Connect field schema it stands for; ValueError names the valid hints."""
    h = hint.strip().lower()
    m = _DECIMAL_HINT.match(h)
    if m:
        return {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": m.group(1)}}
    if h in HINTS:
        return HINTS[h]
    raise ValueError(f"unknown column type hint {hint!r}; use one of {', '.join(HINTS)}, decimal(SCALE)")


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class ParseOptions:
    """How to read one topic's records.

    ``version``: ``sequence`` (Postgres connector: ``source.sequence``, the pair (last commit LSN,
    change LSN) as one integer, see :func:`sequence_version`; ``lsn`` is accepted as an alias, so
    configurations written before it get commit order too) or ``binlog`` (MySQL: ``source.file``
    index * 2**32 + ``source.pos``). ``hints``: column -> hint (see
    :data:`HINTS`). ``placeholder``: the connector's ``unavailable.value.placeholder``.
    """

    version: VersionMode = "sequence"
    hints: Mapping[str, str] = field(default_factory=dict)
    placeholder: str = PLACEHOLDER
    _hinted: dict[str, Converter] = field(default_factory=dict, init=False, repr=False, compare=False)
    _placeholders: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    _decoders: dict[bytes | str, _RowDecoder] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Schema text (as it appears in a record) -> the row decoder built from it; see :func:`_envelope`."""
    _recent: list[tuple[Any, _RowDecoder]] = field(default_factory=list, init=False, repr=False, compare=False)
    """The last few (raw schema, decoder) pairs: a topic is one table, so its records nearly always repeat
    the schema just seen, and comparing the raw bytes costs a tenth of copying and hashing them."""
    _times: list[Any] = field(default_factory=lambda: [None, None], init=False, repr=False, compare=False)
    """The last ``source.ts_ms`` and its datetime: the changes of one transaction share their commit time."""

    def __post_init__(self) -> None:
        hinted: dict[str, Converter] = {}
        for column, hint in self.hints.items():
            conv = converter_for(hint_schema(hint))
            hinted[column] = conv or _text
        object.__setattr__(self, "_hinted", hinted)
        # a bytes-typed column carries the placeholder's bytes, so base64 of them in JSON
        encoded = base64.b64encode(self.placeholder.encode()).decode()
        object.__setattr__(self, "_placeholders", frozenset((self.placeholder, encoded)))


DEFAULT_OPTIONS = ParseOptions()
_KEY_OPTIONS = ParseOptions()  # record keys: only their schema cache is used


# ------------------------------------------------------------------------------ envelope


_DECODER = json.JSONDecoder(parse_float=Decimal)
"""Built once: ``json.loads(..., parse_float=Decimal)`` builds a new decoder (and scanner) per call."""
_decode = _DECODER.decode


def _loads(data: bytes | str) -> Any:
    """A record key or value as ``json.loads(data, parse_float=Decimal)`` reads it, with one shared decoder."""
    try:
        if not isinstance(data, str):
            data = data.decode(json.detect_encoding(data), "surrogatepass")  # as json.loads does for bytes
        return _decode(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParseError(f"not JSON: {exc}") from None


_WS = "[ \t\n\r]*"  # JSON whitespace (re's \s would accept more than JSON does)
_HEAD = re.compile(f'{_WS}\\{{{_WS}"schema"{_WS}:{_WS}')
_SEP = re.compile(f"{_WS},{_WS}")
_PAYLOAD = re.compile(f'"payload"{_WS}:{_WS}')
_TAIL = re.compile(f"{_WS}\\}}{_WS}")
_RECENT_MAX = 4  # schemas compared by bytes before the dict lookup (one per table of the topic, usually one)
_DECODERS_MAX = 256  # distinct schemas remembered per topic options (a table's schema changes rarely)


if msgspec is not None:
    class _Enveloped(msgspec.Struct, forbid_unknown_fields=True):
        """``{"schema": S, "payload": P}`` and nothing else (a missing or extra key fails the decode)."""

        schema: msgspec.Raw
        payload: Any

    _FAST: Any = msgspec.json.Decoder(_Enveloped, float_hook=Decimal)
    _FAST_ANY: Any = msgspec.json.Decoder(float_hook=Decimal)
    _FAST_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, RecursionError)  # json says why
else:  # pragma: no cover - msgspec is part of the kafka extra
    _FAST = _FAST_ANY = None
    _FAST_ERRORS = ()


def _envelope(value: bytes | str, options: ParseOptions) -> tuple[Any, _RowDecoder]:
    """A record value -> (payload, the row decoder for its schema); msgspec when it can, else the json path.

    msgspec decodes the envelope in one pass in C: the payload into the same Python objects as
    ``json.loads(..., parse_float=Decimal)`` (``float_hook=Decimal``; integers of any size stay ``int``),
    the schema only skipped over and kept as raw bytes, which are the cache key. It accepts only a
    document that is exactly ``{"schema": S, "payload": P}`` in strict UTF-8 JSON; anything else (no
    schema, another key, ``NaN``, a lone surrogate escape, another encoding, a malformed record) takes
    a plain msgspec decode of the whole document, and what msgspec refuses :func:`_envelope_json`, so the
    result, and the error for bad input, is the one the json path gives.
    """
    if _FAST is not None:
        try:
            env = _FAST.decode(value)
        except _FAST_ERRORS:  # not exactly an envelope: any JSON document, else the json path
            try:
                payload, schema = _unwrap(_FAST_ANY.decode(value))
            except _FAST_ERRORS:
                return _envelope_json(value, options)
            return payload, _RowDecoder(schema, options)
        else:
            raw = env.schema
            recent = options._recent
            for seen, known in recent:
                if seen == raw:  # memcmp; a schema of another length fails at once
                    return env.payload, known
            key = bytes(raw)
            decoder = options._decoders.get(key)
            if decoder is None:
                try:
                    schema = _FAST_ANY.decode(key)
                except _FAST_ERRORS:
                    return _envelope_json(value, options)
                if len(options._decoders) >= _DECODERS_MAX:
                    options._decoders.clear()
                decoder = options._decoders[key] = _RowDecoder(schema if isinstance(schema, dict) else None, options)
            if len(recent) >= _RECENT_MAX:
                del recent[0]
            recent.append((raw, decoder))
            return env.payload, decoder
    return _envelope_json(value, options)


def _envelope_json(value: bytes | str, options: ParseOptions) -> tuple[Any, _RowDecoder]:
    """A record value -> (payload, the row decoder for its schema), parsing a repeated schema only once.

    With ``schemas.enable=true`` every record repeats its table's schema, and the schema is most of
    the record (~2.8 of 3.5 KB for a five-column table): parsing it was most of the cost of a record.
    JsonConverter writes ``{"schema":S,"payload":P}`` with the schema first, so the text between
    ``"schema":`` and ``"payload"`` is looked up as is; a hit parses only P. A text is remembered only
    after it was checked to be exactly one JSON value followed by a comma, and a hit still requires
    the document to end right after P, so the result is what ``json.loads`` and :func:`_unwrap` give
    (any other shape takes that path).
    """
    if not isinstance(value, str):
        try:
            value = value.decode(json.detect_encoding(value), "surrogatepass")  # as json.loads does
        except UnicodeDecodeError as exc:
            raise ParseError(f"not JSON: {exc}") from None
    head = _HEAD.match(value)
    if head is not None:
        start = head.end()
        at = value.find('"payload"', start)
        if at > start:
            key = value[start:at]
            decoder = options._decoders.get(key)
            try:
                if decoder is None:
                    schema, end = _DECODER.raw_decode(value, start)
                    if not _SEP.fullmatch(value, end, at):
                        raise ValueError("not a schema followed by a comma")
                else:
                    schema = decoder.schema
                p = _PAYLOAD.match(value, at)
                if p is not None:
                    payload, end = _DECODER.raw_decode(value, p.end())
                    if _TAIL.fullmatch(value, end):
                        if decoder is None:
                            if len(options._decoders) >= _DECODERS_MAX:
                                options._decoders.clear()
                            decoder = options._decoders[key] = _RowDecoder(
                                schema if isinstance(schema, dict) else None, options)
                        return payload, decoder
            except ValueError:  # JSONDecodeError included: the general path says what is wrong
                pass
    payload, schema = _unwrap(_loads(value))
    return payload, _RowDecoder(schema, options)


def _unwrap(doc: Any) -> tuple[Any, Mapping[str, Any] | None]:
    """``{"schema": ..., "payload": ...}`` (schemas.enable=true) -> (payload, schema); else (doc, None)."""
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        schema = doc["schema"]
        return doc["payload"], schema if isinstance(schema, dict) else None
    return doc, None


def _row_schema(schema: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """Column name -> field schema, from the envelope's ``after`` (or ``before``) struct."""
    if schema is None:
        return {}
    for part in ("after", "before"):
        for f in schema.get("fields") or ():
            if isinstance(f, Mapping) and f.get("field") == part and isinstance(f.get("fields"), list):
                return {c["field"]: c for c in f["fields"] if isinstance(c, Mapping) and "field" in c}
    return {}


_LSN_LIMIT = 2**64
_SEQUENCE = re.compile(r'\[(?:"([0-9]+)"|null), ?(?:"([0-9]+)"|null)\]')
"""``source.sequence`` as the connector writes it: ``["<last commit LSN>","<change LSN>"]``, either may be null."""


def _lsn(v: Any) -> int | None:
    """An LSN as Debezium writes it (a JSON number, or a decimal string inside ``sequence``); None: null."""
    if v is None:
        return None
    if isinstance(v, str) and v.isascii() and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _LSN_LIMIT:
        raise ParseError(f"not an LSN: {v!r}")
    return v


def sequence_version(source: Mapping[str, Any], op: Any = None) -> tuple[int, bool]:
    """(version, fence) of a Postgres connector record, ordered by commit.

    ``source.lsn`` is the LSN of the *change*: concurrent transactions interleave their changes, so a
    transaction that committed later can carry a lower change LSN, and a tombstone at that version would
    be refused as older (the fill guard bypassed). ``source.sequence`` is ``["<last commit LSN>",
    "<change LSN>"]``, the pair increases in commit order, so the version is ``last_commit * 2**64 + lsn``
    (exact: versions are decimal strings compared by length, then text).

    Where the pair cannot place the record in commit order the record is a *fence* (applied as
    invalidation only, docs/versions.md), at version ``lsn`` (pair ``(0, lsn)``: a lower bound of its
    true place, so it never claims to be newer than it is): the first transaction after Debezium starts
    streaming (last commit LSN ``null``), snapshot reads (not changes; no commit order), and records
    without a usable ``sequence``.
    """
    lsn = _lsn(source.get("lsn"))
    raw = source.get("sequence")
    pair: Any = raw
    last: int | None = None
    if isinstance(raw, str):
        m = _SEQUENCE.fullmatch(raw)  # what the connector writes; anything else takes json.loads
        if m is not None:
            a, b = m.groups()
            pair = [a, b]
            if a is not None and b is not None:
                # the usual record: two decimal LSNs (the pattern allows only ASCII digits), read without
                # the general pair path below, which gives the same for them
                last_, change_ = int(a), int(b)
                if last_ < _LSN_LIMIT and change_ < _LSN_LIMIT:
                    last, lsn, pair = last_, change_, None
        else:
            try:
                pair = json.loads(raw)
            except json.JSONDecodeError:
                pair = None
    if isinstance(pair, list) and len(pair) == 2:
        try:
            last, change = _lsn(pair[0]), _lsn(pair[1])
        except ParseError:
            last, change = None, None
        if change is not None:
            lsn = change
    if lsn is None:
        raise ParseError(f"source.lsn/sequence missing or malformed ({source.get('lsn')!r}, {raw!r}); is this the "
                         "Postgres connector? (MySQL topics need version: binlog)")
    snapshot = source.get("snapshot")
    if last is None or op == "r" or snapshot not in (None, False, "false"):
        return lsn, True
    return last * _LSN_LIMIT + lsn, False


def _version(source: Mapping[str, Any], mode: VersionMode, op: Any = None) -> tuple[int, bool]:
    """(version, fence) for a record; only the Postgres ``sequence`` mode produces fences."""
    if mode in ("sequence", "lsn"):
        return sequence_version(source, op)
    file, pos = source.get("file"), source.get("pos")
    m = re.search(r"\.(\d+)$", file) if isinstance(file, str) else None
    if m is None or isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < 2**32:
        raise ParseError(f"source.file/pos missing or malformed ({file!r}, {pos!r}) for version: binlog")
    return int(m.group(1)) * 2**32 + pos, False


def _commit_time(source: Mapping[str, Any], memo: list[Any] | None = None) -> datetime | None:
    """``source.ts_ms`` as a datetime; ``memo`` ([ts, datetime], per topic) skips the conversion when it repeats."""
    ts = source.get("ts_ms")
    if memo is not None and ts == memo[0] and type(ts) is int:
        return memo[1]  # type: ignore[no-any-return]
    if isinstance(ts, int) and not isinstance(ts, bool):
        try:
            when = datetime.fromtimestamp(ts / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
        if memo is not None:
            memo[0], memo[1] = ts, when
        return when
    return None


class _RowDecoder:
    """Decodes the ``before``/``after`` structs of one record with its schema and the topic's hints."""

    def __init__(self, schema: Mapping[str, Any] | None, options: ParseOptions) -> None:
        self.schema = schema
        self.fields = _row_schema(schema)
        self.options = options
        self.convs: dict[str, Converter | None] = {}

    def _conv(self, column: str) -> Converter | None:
        if column not in self.convs:
            conv = self.options._hinted.get(column)
            if conv is None and column in self.fields:
                conv = converter_for(self.fields[column])
            self.convs[column] = conv
        return self.convs[column]

    def row(self, data: Any, part: str) -> Row | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ParseError(f"{part} is not an object")
        placeholders = self.options._placeholders
        convs = self.convs
        out: Row = {}
        for column, v in data.items():
            if v is None:
                out[column] = None
                continue
            if isinstance(v, str):
                if v in placeholders:
                    out[column] = UNAVAILABLE
                    continue
            elif isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) and v[0] in placeholders:
                out[column] = UNAVAILABLE
                continue
            conv = convs[column] if column in convs else self._conv(column)
            if conv is _text:  # the identity: no call (string columns, most of a row)
                out[column] = v
                continue
            try:
                out[column] = conv(v) if conv is not None else _generic(v)
            except ParseError as exc:
                raise ParseError(f"{part}.{column}: {exc}") from None
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise ParseError(f"{part}.{column}: cannot decode {v!r}: {exc}") from None
        return out


def _key_columns(key: bytes | str | None) -> set[str] | None:
    """Column names of the record key (the table's primary key / replica identity), if it has one."""
    if key is None:
        return None
    try:
        payload, _ = _envelope(key, _KEY_OPTIONS)
    except ParseError:
        return None
    return set(payload) if isinstance(payload, dict) else None


def _mark_key_only(before: Row, key_columns: set[str] | None) -> None:
    """A default-identity delete: Debezium sends the key columns and nulls for the rest.

    Those nulls mean *not sent*, not SQL NULL (pgoutput's ``K`` tuple), so they become
    UNAVAILABLE and the rules report a key they cannot compute instead of silently
    treating it as "no such key". Heuristic: every non-key column is null. A
    ``REPLICA IDENTITY FULL`` row whose non-key columns really are all NULL is then
    over-reported (a logged unresolvable key), never under-invalidated.
    """
    if not key_columns:
        return
    others = []
    for c, v in before.items():
        if c not in key_columns:
            if v is not None:
                return  # a value beside the key: the row was sent whole (the common case, decided here)
            others.append(c)
    if others and all(c in before for c in key_columns):
        for c in others:
            before[c] = UNAVAILABLE


def _skippable(payload: Mapping[str, Any]) -> bool:
    """Records without ``op`` that carry no change by design."""
    if "ddl" in payload or "tableChanges" in payload:  # schema change topic (MySQL, SQL Server...)
        return True
    if payload.get("status") in ("BEGIN", "END") and "id" in payload:  # transaction metadata topic
        return True
    return set(payload) <= {"ts_ms"}  # heartbeat topic


def parse_record(value: bytes | str | None, key: bytes | str | None, position: Any, origin: str = "",
                 options: ParseOptions = DEFAULT_OPTIONS) -> Transaction | Rejected | None:
    """One Kafka record -> a Transaction, a Rejected, or None for a record that is no change.

    Never raises for bad input: the reason goes into the Rejected with the raw value.
    """
    if value is None:
        return None  # delete tombstone: compaction marker, the 'd' event carried the change
    try:
        return _parse(value, key, position, origin, options)
    except ParseError as exc:
        return Rejected(str(exc), position=position, raw=value, origin=origin)
    except Exception as exc:  # a bug here must not stop the stream: dead-letter it with the reason
        return Rejected(f"unexpected {type(exc).__name__}: {exc}", position=position, raw=value, origin=origin)


def _parse(value: bytes | str, key: bytes | str | None, position: Any, origin: str,
           options: ParseOptions) -> Transaction | None:
    payload, decoder = _envelope(value, options)
    if payload is None:
        return None  # schemas.enable=true tombstone written as {"schema": null, "payload": null}
    if not isinstance(payload, dict):
        raise ParseError(f"expected a JSON object, got {type(payload).__name__}")
    op = payload.get("op")
    if op is None:
        if _skippable(payload):
            return None
        raise ParseError("no 'op': not a Debezium change event (is an SMT such as ExtractNewRecordState "
                         "unwrapping the envelope? cdcd needs the full envelope)")
    source = payload.get("source")
    if not isinstance(source, dict):
        raise ParseError("no 'source' block")
    version, fence = _version(source, options.version, op)
    txid = source.get("txId")
    common: dict[str, Any] = {
        "version": version, "fence": fence, "position": position, "origin": origin,
        "commit_time": _commit_time(source, options._times),
        "xid": txid if isinstance(txid, int) and not isinstance(txid, bool) else None,
    }
    if op == "m":
        return _message(payload, common)
    if op not in _OPS:
        raise ParseError(f"unknown op {op!r}")
    schema_name = source.get("schema") or source.get("db")  # MySQL has databases, not schemas
    table = source.get("table")
    if not isinstance(schema_name, str) or not isinstance(table, str) or not table:
        raise ParseError("source.schema/db or source.table missing")
    kind = _OPS[op]
    if kind is Op.TRUNCATE:
        return Transaction(changes=[Change(Op.TRUNCATE, schema_name, table)], **common)
    before = decoder.row(payload.get("before"), "before")
    after = decoder.row(payload.get("after"), "after")
    if kind in (Op.INSERT, Op.READ, Op.UPDATE) and after is None:
        raise ParseError(f"op {op!r} without 'after'")
    if kind is Op.DELETE and before is None:
        raise ParseError("op 'd' without 'before'")
    if before is not None:
        _mark_key_only(before, _key_columns(key))
        if after is not None:
            # REPLICA IDENTITY FULL: an unchanged TOASTed column is a placeholder in 'after' but
            # whole in 'before' (as pgoutput's old tuple); the value did not change, so use it.
            for column, v in after.items():
                if v is UNAVAILABLE and before.get(column, UNAVAILABLE) is not UNAVAILABLE:
                    after[column] = before[column]
    return Transaction(changes=[Change(kind, schema_name, table, before, after)], **common)


def _message(payload: Mapping[str, Any], common: dict[str, Any]) -> Transaction | None:
    """Op ``m``: ``pg_logical_emit_message`` with prefix ``cdcd`` -> explicit invalidations.

    The Postgres connector puts the content in ``message.content`` as bytes, which
    JsonConverter writes as base64 (schemas on or off). Plain JSON text is accepted
    too, for producers that are not Kafka Connect.
    """
    message = payload.get("message")
    if not isinstance(message, dict):
        raise ParseError("op 'm' without a 'message' object")
    if message.get("prefix") != MESSAGE_PREFIX:
        return None  # another application's message
    content = message.get("content")
    if not isinstance(content, str):
        raise ParseError(f"cdcd message content is not a string: {content!r}")
    raw: bytes | str = content
    if not content.lstrip().startswith("{"):
        try:
            raw = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raw = content
    try:
        invalidation = parse_invalidation(raw)
    except ValueError as exc:
        raise ParseError(f"malformed cdcd message: {exc}") from None
    return Transaction(changes=[], invalidations=[invalidation], **common)
