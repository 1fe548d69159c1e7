"""The msgspec envelope path gives exactly what the json path gives, for good and hostile records.

``_envelope`` decodes ``{"schema": S, "payload": P}`` with msgspec and hands everything msgspec
refuses (or reads differently) to the json path; these tests run every record both ways
(``_FAST`` switched off is the json path alone) and compare the parsed results, errors included.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cdcd.sources import debezium
from cdcd.sources.debezium import ParseOptions, parse_record
from tests.kafka.test_schema_cache import SCHEMA, docs, payload, same

pytestmark = pytest.mark.skipif(debezium._FAST is None, reason="msgspec not installed")


def hostile() -> list[bytes | str]:
    p = payload(400)
    s = json.dumps(SCHEMA, separators=(",", ":"))
    row = dict(p["after"])
    out: list[bytes | str] = []
    for value in (2**70, -(2**70), 1.5, 1e400, "\\ud800", "é", "\u2028", True, [1, 2], {"a": {"b": None}}):
        r = {**row, "email": value}
        out.append(json.dumps({"schema": json.loads(s), "payload": {**p, "after": r}}))
    text = json.dumps({"schema": SCHEMA, "payload": p})
    out += [
        text.replace('"email"', '"em\\u0061il"'),               # escaped key
        text.replace('"ada@example.com"', '"ada\\ud800"'),       # lone surrogate escape (json accepts it)
        text.replace('"ada@example.com"', "NaN"),                # NaN literal (json accepts it)
        text.replace('"ada@example.com"', "Infinity"),
        text.replace('"ada@example.com"', "1.50"),               # a fraction: Decimal both ways
        text.replace('"ada@example.com"', "123456789012345678901234567890"),
        text.encode("utf-16"),                                   # json.loads detects UTF-16
        b"\xef\xbb\xbf" + text.encode(),                         # UTF-8 BOM
        text.encode()[:-1] + b"\xff}",                           # invalid UTF-8
        json.dumps(p),                                           # schemas.enable=false: the payload alone
        "[1, 2]", "null", "", "{", '{"schema":{},"payload":{}}', '{"schema":[],"payload":{"op":"c"}}',
        "[" * 5000 + "]" * 5000,                                 # deep nesting
    ]
    return out


def parse(value: bytes | str, key: bytes | None, monkeypatch: pytest.MonkeyPatch, fast: bool) -> Any:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(debezium, "_FAST", None)
        return parse_record(value, key, ("t", 0, 0), "o", ParseOptions())


@pytest.mark.parametrize("value", [*docs(), *hostile()], ids=lambda v: repr(v[:40]))
def test_fast_path_parses_as_the_json_path_does(value: bytes | str, monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ([value, value.encode()] if isinstance(value, str) else [value]):
        want = parse(v, None, monkeypatch, fast=False)
        got = parse(v, None, monkeypatch, fast=True)
        assert same(got, want), (got, want)


def test_key_columns_read_the_same_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [b'{"schema":{"type":"struct","fields":[]},"payload":{"id":1,"tenant":2}}', b'{"id":1}', b"7",
            b'{"schema":null,"payload":null}', b"not json"]
    for key in keys:
        with monkeypatch.context() as m:
            m.setattr(debezium, "_FAST", None)
            want = debezium._key_columns(key)
        assert debezium._key_columns(key) == want, key


def test_the_fast_path_is_taken_for_an_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = debezium._envelope_json
    monkeypatch.setattr(debezium, "_envelope_json", lambda *a: calls.append(a) or real(*a))
    value = json.dumps({"schema": SCHEMA, "payload": payload(500)}).encode()
    options = ParseOptions()
    assert parse_record(value, None, ("t", 0, 0), "o", options) is not None
    assert parse_record(value, None, ("t", 0, 0), "o", options) is not None
    assert calls == [] and len(options._decoders) == 1
