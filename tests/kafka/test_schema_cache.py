"""A repeated schema is parsed once, and parsing through the cache gives exactly what a fresh parse gives.

``_envelope`` looks a record's schema up by its text; these tests feed it documents
whose shape is *almost* ``{"schema": S, "payload": P}`` and check the result is always
the one ``json.loads`` + ``_unwrap`` give, and that the shortcut is really taken for the
shape JsonConverter writes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cdcd.change import Transaction
from cdcd.sources import debezium
from cdcd.sources.debezium import ParseOptions, parse_record
from tests.kafka.test_daemon_kafka import USER_FIELDS, user, user_event

ROW = {"type": "struct", "optional": True, "fields": USER_FIELDS}
SCHEMA = {"type": "struct", "fields": [{**ROW, "field": "before"}, {**ROW, "field": "after"},
                                       {"type": "struct", "fields": [], "field": "source"},
                                       {"type": "string", "field": "op"}]}


def payload(lsn: int, email: str = "ada@example.com") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(user_event("c", lsn, None, user(1, email)))["payload"]
    return doc


def fresh(value: bytes | str, key: bytes | None = None) -> Any:
    """The reference: a parse with options whose cache is empty, and stays so."""
    options = ParseOptions()
    out = parse_record(value, key, ("t", 0, 0), "o", options)
    options._decoders.clear()
    return out


def cached(value: bytes | str, options: ParseOptions, key: bytes | None = None) -> Any:
    return parse_record(value, key, ("t", 0, 0), "o", options)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Transaction) and isinstance(b, Transaction):
        return (a.version, a.fence, [vars(c) if hasattr(c, "__dict__") else c for c in a.changes]) == \
            (b.version, b.fence, [vars(c) if hasattr(c, "__dict__") else c for c in b.changes])
    return repr(a) == repr(b)


def test_a_repeated_schema_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    options = ParseOptions()
    compact = [json.dumps({"schema": SCHEMA, "payload": payload(100 + i)}, separators=(",", ":")) for i in range(5)]
    built = []
    real = debezium._RowDecoder

    def counting(schema: Any, opts: ParseOptions) -> Any:
        built.append(schema)
        return real(schema, opts)

    monkeypatch.setattr(debezium, "_RowDecoder", counting)
    results = [cached(v.encode(), options) for v in compact]
    assert len(built) == 1 and built[0] == SCHEMA  # one decoder for five records
    assert len(options._decoders) == 1
    assert [t.version for t in results] == [(100 + i - 1) * 2**64 + 100 + i for i in range(5)]
    assert all(same(r, fresh(v)) for r, v in zip(results, compact, strict=True))


def docs() -> list[str]:
    s, p = json.dumps(SCHEMA), json.dumps(payload(200))
    s_compact = json.dumps(SCHEMA, separators=(",", ":"))
    other = json.dumps(payload(300, "grace@example.com"))
    return [
        f'{{"schema":{s_compact},"payload":{p}}}',           # JsonConverter's shape
        f'{{"schema": {s}, "payload": {p}}}',                 # Python's json.dumps shape
        f' \n{{ "schema" : {s} ,\n "payload" : {p} }}\n',     # JSON whitespace anywhere
        f'{{"schema":{s_compact},"payload":{other}}}',       # same schema text, other payload
        f'{{"schema":{s_compact},"payload":{p},"x":1}}',     # a third key: not an envelope at all
        f'{{"schema":{s_compact},"payload":{p},"schema":null}}',  # duplicate key: the last one wins
        f'{{"schema":{s_compact},"payload":null}}',          # schemas.enable tombstone
        f'{{"schema":{s_compact},"payload":{p}',             # truncated
        f'{{"schema":{s_compact},"payload":{p}}} trailing',  # garbage after the document
        f'{{"schema":{s_compact}"payload":{p}}}',            # missing comma
        f'{{"schema":null,"payload":{p}}}',                  # null schema
        f'{{"payload":{p},"schema":{s_compact}}}',           # payload first
        f'{{"schema":{{"payload":1}},"payload":{p}}}',       # "payload" inside the schema
    ]


def test_every_near_envelope_parses_as_a_fresh_parse_does() -> None:
    options = ParseOptions()
    for _ in range(2):  # the second round runs on a warm cache
        for doc in docs():
            for value in (doc, doc.encode()):
                assert same(cached(value, options), fresh(value)), doc[:80]
    assert 1 <= len(options._decoders) <= 4


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debezium, "_DECODERS_MAX", 3)
    options = ParseOptions()
    for i in range(10):
        schema = {**SCHEMA, "name": f"v{i}"}
        t = cached(json.dumps({"schema": schema, "payload": payload(100 + i)}), options)
        assert isinstance(t, Transaction)
        assert len(options._decoders) <= 3


def test_sequence_fast_path_matches_json() -> None:
    for raw in ('["1","2"]', '[null,"2"]', '["007", "8"]', '[ "1","2"]', '["1",null]', '["x","2"]', '[1,2]'):
        src = {"lsn": 5, "sequence": raw}
        try:
            got: Any = debezium.sequence_version(src, "c")
        except debezium.ParseError as exc:
            got = str(exc)
        pair = json.loads(raw)
        try:
            want: Any = debezium.sequence_version({"lsn": 5, "sequence": pair}, "c")
        except debezium.ParseError as exc:
            want = str(exc).replace(repr(pair), repr(raw))
        assert got == want, raw
