"""Debezium envelope parsing on hand-written events (shapes as Debezium 3.6 / JsonConverter write them).

The real-engine test (test_real_debezium.py) checks the same decoding on what a
live connector emits; these pin down the edge cases one by one.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from cdcd.change import UNAVAILABLE, Op, Rejected, Transaction
from cdcd.rules import render_value
from cdcd.sources.debezium import PLACEHOLDER, ParseOptions, hint_schema, parse_record

POS = ("dbserver1.public.items", 0, 42)
LSN = 22_140_656
VERSION = 22_140_000 * 2**64 + LSN  # source.sequence ["22140000", "22140656"]: (last commit, change) as one number


def source(**over: Any) -> dict[str, Any]:
    src = {"version": "3.6.3.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": 1_704_164_645_123,
           "snapshot": "false", "db": "app", "sequence": '["22140000","22140656"]', "schema": "public",
           "table": "items", "txId": 731, "lsn": LSN, "xmin": None}
    src.update(over)
    return src


COLUMNS: list[dict[str, Any]] = [
    {"type": "int32", "optional": False, "field": "id"},
    {"type": "string", "optional": True, "field": "name"},
    {"type": "bytes", "optional": True, "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
     "parameters": {"scale": "2", "connect.decimal.precision": "10"}, "field": "price"},
    {"type": "struct", "optional": True, "name": "io.debezium.data.VariableScaleDecimal", "version": 1,
     "fields": [{"type": "int32", "optional": False, "field": "scale"},
                {"type": "bytes", "optional": False, "field": "value"}], "field": "vprice"},
    {"type": "float", "optional": True, "field": "f4"},
    {"type": "double", "optional": True, "field": "f8"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "ts"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.Timestamp", "version": 1, "field": "ts3"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.NanoTimestamp", "version": 1, "field": "tsn"},
    {"type": "string", "optional": True, "name": "io.debezium.time.ZonedTimestamp", "version": 1, "field": "tstz"},
    {"type": "int32", "optional": True, "name": "io.debezium.time.Date", "version": 1, "field": "d"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTime", "version": 1, "field": "tm"},
    {"type": "string", "optional": True, "name": "io.debezium.data.Uuid", "version": 1, "field": "u"},
    {"type": "string", "optional": True, "name": "io.debezium.data.Json", "version": 1, "field": "j"},
    {"type": "bytes", "optional": True, "field": "b"},
    {"type": "boolean", "optional": True, "field": "flag"},
    {"type": "int16", "optional": True, "field": "s"},
    {"type": "int64", "optional": True, "field": "l"},
    {"type": "array", "items": {"type": "string", "optional": True}, "optional": True, "field": "tags"},
]

# as captured from Debezium 3.6.3 for:
# (1, 'a', 12.50, 3.14159, 0.1, 0.1, '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.123',
#  '2024-01-02 03:04:05.123456+02', '2024-01-02', '12:34:56.5', 'A0EEBC99-...', '{"a": [1, 2]}', '\xdeadbeef', ...)
ROW = {"id": 1, "name": "a", "price": "BOI=", "vprice": {"scale": 5, "value": "BMsv"}, "f4": 0.1, "f8": 0.1,
       "ts": 1_704_164_645_123_456, "ts3": 1_704_164_645_123, "tsn": 1_704_164_645_123_456_789,
       "tstz": "2024-01-02T01:04:05.123456Z", "d": 19724, "tm": 45_296_500_000,
       "u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "j": '{"a": [1, 2.5]}', "b": "3q2+7w==", "flag": True,
       "s": 7, "l": 9_007_199_254_740_993, "tags": ["x", "y"]}

EXPECTED = {"id": 1, "name": "a", "price": Decimal("12.50"), "vprice": Decimal("3.14159"), "f4": 0.1, "f8": 0.1,
            "ts": datetime(2024, 1, 2, 3, 4, 5, 123456), "ts3": datetime(2024, 1, 2, 3, 4, 5, 123000),
            "tsn": datetime(2024, 1, 2, 3, 4, 5, 123456),
            "tstz": datetime(2024, 1, 2, 1, 4, 5, 123456, tzinfo=UTC), "d": date(2024, 1, 2), "tm": "12:34:56.5",
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": {"a": [1, 2.5]}, "b": b"\xde\xad\xbe\xef",
            "flag": True, "s": 7, "l": 9_007_199_254_740_993, "tags": ["x", "y"]}


def value_schema(columns: list[dict[str, Any]] = COLUMNS) -> dict[str, Any]:
    row = {"type": "struct", "fields": columns, "optional": True, "name": "dbserver1.public.items.Value"}
    return {"type": "struct", "name": "dbserver1.public.items.Envelope", "version": 2, "optional": False, "fields": [
        {**row, "field": "before"}, {**row, "field": "after"},
        {"type": "struct", "fields": [], "optional": False, "name": "io.debezium.connector.postgresql.Source",
         "field": "source"},
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"}]}


def event(op: str, before: dict[str, Any] | None = None, after: dict[str, Any] | None = None,
          schemas: bool = True, columns: list[dict[str, Any]] = COLUMNS, **src: Any) -> bytes:
    payload = {"before": before, "after": after, "source": source(**src), "transaction": None, "op": op,
               "ts_ms": 1_704_164_645_200}
    doc = {"schema": value_schema(columns), "payload": payload} if schemas else payload
    return json.dumps(doc).encode()


def key(id_: int, schemas: bool = True) -> bytes:
    payload = {"id": id_}
    if not schemas:
        return json.dumps(payload).encode()
    schema = {"type": "struct", "fields": [{"type": "int32", "optional": False, "field": "id"}], "optional": False,
              "name": "dbserver1.public.items.Key"}
    return json.dumps({"schema": schema, "payload": payload}).encode()


def txn(item: Transaction | Rejected | None) -> Transaction:
    assert isinstance(item, Transaction), item
    return item


def after(item: Transaction | Rejected | None) -> dict[str, Any]:
    """The new row of a one-change transaction."""
    row = txn(item).changes[0].after
    assert row is not None
    return row


# ------------------------------------------------------------------------------ envelope and types


def test_insert_with_schema_decodes_every_type_like_pgoutput() -> None:
    t = txn(parse_record(event("c", after=ROW), key(1), POS, "kafka:items/0"))
    assert t.version == VERSION and not t.fence and t.position == POS and t.origin == "kafka:items/0"
    assert t.xid == 731
    assert t.commit_time == datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    (c,) = t.changes
    assert (c.op, c.schema, c.table, c.before) == (Op.INSERT, "public", "items", None)
    assert c.after == EXPECTED
    for col, v in EXPECTED.items():  # same Python types, so the same rendered key text
        assert type(c.after[col]) is type(v), col
        assert render_value(c.after[col]) == render_value(v)
    assert render_value(c.after["price"]) == "12.50"
    assert render_value(c.after["tstz"]) == "2024-01-02T01:04:05.123456+00:00"


def test_without_schema_values_pass_through_as_json_types() -> None:
    t = txn(parse_record(event("c", after=ROW, schemas=False), key(1, False), POS))
    after = t.changes[0].after
    assert after is not None
    assert after["ts"] == ROW["ts"] and after["price"] == "BOI=" and after["tstz"] == ROW["tstz"]
    assert after["vprice"] == Decimal("3.14159")  # the one struct the connector emits is unambiguous
    assert after["f8"] == 0.1 and type(after["f8"]) is float
    assert after["u"] == ROW["u"]  # no schema, no hint: not even lower-cased


def test_hints_give_schemaless_records_the_schema_types() -> None:
    hints = {"price": "decimal(2)", "ts": "timestamp", "ts3": "timestamp_ms", "tsn": "timestamp_ns",
             "tstz": "timestamptz", "d": "date", "tm": "time", "u": "uuid", "j": "json", "b": "bytea"}
    t = txn(parse_record(event("c", after=ROW, schemas=False), key(1, False), POS,
                         options=ParseOptions(hints=hints)))
    after = t.changes[0].after
    assert after is not None
    assert {c: after[c] for c in hints} == {c: EXPECTED[c] for c in hints}


def test_decimal_handling_modes() -> None:
    col = [{"type": "int32", "optional": False, "field": "id"}, {"type": "string", "optional": True, "field": "p"}]
    # string mode: a plain string schema; renders the same, and a 'decimal' hint makes it a Decimal
    raw = event("c", after={"id": 1, "p": "12.50"}, columns=col)
    assert txn(parse_record(raw, None, POS)).changes[0].after == {"id": 1, "p": "12.50"}
    t = txn(parse_record(raw, None, POS, options=ParseOptions(hints={"p": "decimal"})))
    assert t.changes[0].after == {"id": 1, "p": Decimal("12.50")}
    assert str(after(t)["p"]) == "12.50"
    # JsonConverter decimal.format=NUMERIC: an exact JSON number, brought to the column's scale
    num = [col[0], {"type": "bytes", "optional": True, "name": "org.apache.kafka.connect.data.Decimal",
                    "parameters": {"scale": "2"}, "field": "p"}]
    raw = event("c", after={"id": 1, "p": 0}, columns=num).replace(b'"p": 0', b'"p": 12.5')
    assert str(after(parse_record(raw, None, POS))["p"]) == "12.50"
    # negative and large precise values
    big = -(10**40 + 7)
    b64 = base64.b64encode(big.to_bytes(20, "big", signed=True)).decode()
    raw = event("c", after={"id": 1, "p": b64}, columns=num)
    assert after(parse_record(raw, None, POS))["p"] == Decimal(f"{big}E-2")
    # double mode loses the scale: documented, not recoverable
    dbl = [col[0], {"type": "double", "optional": True, "field": "p"}]
    assert after(parse_record(event("c", after={"id": 1, "p": 12.5}, columns=dbl), None, POS))["p"] == 12.5


def test_update_delete_snapshot_and_truncate() -> None:
    u = txn(parse_record(event("u", before=None, after={**ROW, "name": "b"}), key(1), POS)).changes[0]
    assert u.op is Op.UPDATE and u.before is None and u.after is not None and u.after["name"] == "b"
    r = txn(parse_record(event("r", after=ROW, snapshot="last"), key(1), POS)).changes[0]
    assert r.op is Op.READ and r.after == EXPECTED
    t = txn(parse_record(event("t"), None, POS))
    assert [(c.op, c.relation, c.before, c.after) for c in t.changes] == [(Op.TRUNCATE, "public.items", None, None)]


def test_default_identity_delete_marks_unsent_columns_unavailable() -> None:
    before = dict.fromkeys(ROW) | {"id": 1}  # what Debezium sends: the key, nulls for the rest
    d = txn(parse_record(event("d", before=before), key(1), POS)).changes[0]
    assert d.op is Op.DELETE and d.after is None and d.before is not None
    assert d.before["id"] == 1
    assert all(d.before[c] is UNAVAILABLE for c in ROW if c != "id")


def test_full_identity_delete_keeps_real_nulls() -> None:
    before = {**ROW, "name": None}
    d = txn(parse_record(event("d", before=before), key(1), POS)).changes[0]
    assert d.before is not None and d.before["name"] is None and d.before["price"] == Decimal("12.50")


def test_tombstone_is_no_change() -> None:
    assert parse_record(None, key(1), POS) is None
    assert parse_record(b'{"schema":null,"payload":null}', key(1), POS) is None


def test_toast_placeholder_becomes_unavailable() -> None:
    after = {**ROW, "name": PLACEHOLDER, "b": base64.b64encode(PLACEHOLDER.encode()).decode(),
             "tags": [PLACEHOLDER], "j": PLACEHOLDER}
    c = txn(parse_record(event("u", after=after), key(1), POS)).changes[0]
    assert c.after is not None
    for col in ("name", "b", "tags", "j"):
        assert c.after[col] is UNAVAILABLE, col
    assert c.after["price"] == Decimal("12.50")


def test_toast_placeholder_filled_from_full_before() -> None:
    before = {**ROW, "name": "long text"}
    after = {**ROW, "name": PLACEHOLDER, "s": 8}
    c = txn(parse_record(event("u", before=before, after=after), key(1), POS)).changes[0]
    assert c.after is not None and c.after["name"] == "long text" and c.after["s"] == 8


def test_custom_placeholder() -> None:
    opts = ParseOptions(placeholder="<toast>")
    c = txn(parse_record(event("u", after={**ROW, "name": "<toast>"}), None, POS, options=opts)).changes[0]
    assert c.after is not None and c.after["name"] is UNAVAILABLE


def test_infinity_and_nanoseconds() -> None:
    after = {**ROW, "tstz": "2024-01-02T01:04:05.123456789Z", "ts": 9_223_372_036_854_775_807}
    c = txn(parse_record(event("c", after=after), None, POS)).changes[0]
    assert c.after is not None
    assert c.after["tstz"] == datetime(2024, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)
    assert c.after["ts"] == "infinity"  # as pgtypes keeps it


# ------------------------------------------------------------------------------ messages


def message(content: str, prefix: str = "cdcd", schemas: bool = True, **src: Any) -> bytes:
    payload = {"op": "m", "ts_ms": 1, "source": source(schema="", table="", **src), "transaction": None,
               "message": {"prefix": prefix, "content": content}}
    if not schemas:
        return json.dumps(payload).encode()
    schema = {"type": "struct", "name": "io.debezium.connector.postgresql.MessageValue", "fields": []}
    return json.dumps({"schema": schema, "payload": payload}).encode()


@pytest.mark.parametrize("schemas", [True, False])
def test_cdcd_message_base64_content(schemas: bool) -> None:
    content = base64.b64encode(b'{"keys":["k1"],"tags":["t1"]}').decode()  # as Debezium sends it
    t = txn(parse_record(message(content, schemas=schemas), b'{"prefix":"cdcd"}', POS))
    assert t.changes == [] and t.version == VERSION
    assert [(i.keys, i.tags) for i in t.invalidations] == [(["k1"], ["t1"])]


def test_cdcd_message_plain_content() -> None:
    t = txn(parse_record(message('{"keys": ["a", "b"]}', txId=None), None, POS))
    assert t.invalidations[0].keys == ["a", "b"] and t.xid is None


def test_other_prefix_is_no_change_and_bad_cdcd_message_is_rejected() -> None:
    assert parse_record(message("AP8=", prefix="other"), None, POS) is None
    bad = message(base64.b64encode(b"plain").decode())
    rej = parse_record(bad, None, POS, "o")
    assert isinstance(rej, Rejected) and "malformed cdcd message" in rej.reason
    assert rej.raw == bad and rej.position == POS and rej.origin == "o"


# ------------------------------------------------------------------------------ versions


def test_binlog_version_for_mysql() -> None:
    raw = event("c", after={"id": 1}, columns=COLUMNS[:1], connector="mysql", file="mysql-bin.000003", pos=154,
                lsn=None, schema=None, db="inventory", table="customers", txId=None)
    t = txn(parse_record(raw, None, POS, options=ParseOptions(version="binlog")))
    assert t.version == 3 * 2**32 + 154
    assert t.changes[0].relation == "inventory.customers"
    later = event("c", after={"id": 1}, columns=COLUMNS[:1], file="mysql-bin.000004", pos=4, lsn=None)
    assert txn(parse_record(later, None, POS, options=ParseOptions(version="binlog"))).version > t.version


def test_lsn_mode_on_a_mysql_record_is_rejected_with_a_hint() -> None:
    raw = event("c", after={"id": 1}, columns=COLUMNS[:1], lsn=None, sequence=None, file="mysql-bin.000003", pos=154)
    rej = parse_record(raw, None, POS)
    assert isinstance(rej, Rejected) and "version: binlog" in rej.reason


def test_sequence_orders_by_commit_not_by_change() -> None:
    """T_b changed first (lower change LSN) but committed after T_a: its version must be higher."""
    t_a = txn(parse_record(event("c", after=ROW, sequence='["100","300"]', lsn=300), None, POS))
    t_b = txn(parse_record(event("c", after=ROW, sequence='["400","200"]', lsn=200), None, POS))
    assert t_b.version > t_a.version and not t_a.fence and not t_b.fence
    assert t_a.version == 100 * 2**64 + 300
    # the sequence may also arrive as a JSON array; "lsn" is an alias of "sequence"
    t_c = txn(parse_record(event("c", after=ROW, sequence=["400", "200"]), None, POS,
                           options=ParseOptions(version="lsn")))
    assert t_c.version == t_b.version


@pytest.mark.parametrize("over", [
    {"sequence": '[null,"500"]', "lsn": 500},  # first transaction after Debezium started streaming
    {"sequence": None, "lsn": 500},  # no sequence at all
    {"sequence": '["garbage"]', "lsn": 500},
    {"sequence": '["100","500"]', "lsn": 500, "snapshot": "true"},  # snapshot read
])
def test_records_without_a_commit_order_are_fences_at_their_change_lsn(over: dict[str, Any]) -> None:
    t = txn(parse_record(event("c", after=ROW, **over), None, POS))
    assert t.fence and t.version == 500


def test_snapshot_read_is_a_fence() -> None:
    t = txn(parse_record(event("r", after=ROW, sequence='["100","500"]', lsn=500, snapshot="last"), None, POS))
    assert t.fence and t.version == 500


# ------------------------------------------------------------------------------ rejects and skips


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"before": null, "after": {"id": 1}}', "no 'op'"),
    (json.dumps({"op": "x", "source": source()}).encode(), "unknown op"),
    (json.dumps({"op": "c", "after": {"id": 1}}).encode(), "no 'source'"),
    (json.dumps({"op": "c", "after": None, "source": source()}).encode(), "without 'after'"),
    (json.dumps({"op": "d", "before": None, "source": source()}).encode(), "without 'before'"),
    (event("c", after={**ROW, "price": "%%%"}), "after.price"),
    (event("c", after={**ROW, "flag": "yes"}), "after.flag"),
    (event("c", after={**ROW, "tstz": "yesterday"}), "after.tstz"),
    (event("c", after={**ROW, "j": "{"}), "after.j"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_records_are_rejected_not_raised(raw: bytes, reason: str) -> None:
    rej = parse_record(raw, None, POS, "kafka:items/0")
    assert isinstance(rej, Rejected), rej
    assert reason in rej.reason
    assert rej.position == POS and rej.raw == raw


@pytest.mark.parametrize("payload", [
    {"ts_ms": 1},  # heartbeat
    {"status": "BEGIN", "id": "571:53195829", "ts_ms": 1, "event_count": None},  # transaction metadata
    {"source": {}, "databaseName": "inventory", "ddl": "CREATE TABLE t (id int)", "tableChanges": []},
])
def test_non_change_records_are_skipped(payload: dict[str, Any]) -> None:
    assert parse_record(json.dumps(payload).encode(), None, POS) is None


def test_hints_are_validated() -> None:
    assert hint_schema("decimal(3)")["parameters"] == {"scale": "3"}
    with pytest.raises(ValueError, match="unknown column type hint"):
        ParseOptions(hints={"x": "datetime"})
