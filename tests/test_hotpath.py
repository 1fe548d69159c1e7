"""The performance rewrites of the hot path produce exactly what the plain implementations produced."""

from __future__ import annotations

import json
import struct
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import pytest
import redis

from cdcd.backplane import Sequencer
from cdcd.change import UNAVAILABLE, Change, Op, Transaction
from cdcd.keyspace import SCRIPTS, Script
from cdcd.pg.pgoutput import DecodeError, PgOutputDecoder
from cdcd.rules import Defaults, KeyspaceSettings, Rules, TableRule, Template, _json_default, encode_projection
from cdcd.sinks.redis import RedisSink
from tests.helpers import unique


def test_projection_encoding_matches_json_dumps() -> None:
    rows: list[dict[str, Any]] = [
        {"id": 1, "n": Decimal("12.50"), "ts": datetime(2024, 2, 29, 10, 11, 12, 500000, tzinfo=UTC),
         "d": date(2024, 1, 2), "t": time(3, 4, 5), "raw": b"\xde\xad", "j": {"a": [1, 2.5, None, True]},
         "s": "Zoë \u2603 \"quoted\"\n", "f": 1e-7, "big": 2**70, "neg": -0.0, "none": None},
        {},
        {"nan": float("nan"), "inf": float("inf")},
    ]
    for row in rows:
        want = json.dumps(row, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()
        assert encode_projection(row) == want
    with pytest.raises(TypeError):
        encode_projection({"x": object()})


@pytest.mark.parametrize("value", [42, -7, "abc", "", True, False, Decimal("1.50"), 1.5, date(2024, 1, 2),
                                   b"\x01", {"b": 1, "a": 2}, None, UNAVAILABLE])
def test_single_column_render_matches_the_general_path(value: Any) -> None:
    fast = Template.parse("user:{x}")
    general = Template.parse("user:{x}:{y}")  # two columns: the general loop
    row = {"x": value, "y": "v"} if value is not UNAVAILABLE else {"y": "v"}
    k = fast.render(row)
    assert (k + ":v" if k is not None else None) == general.render(row)


def test_script_sha_is_the_sha1_of_its_source() -> None:
    import hashlib

    for s in SCRIPTS.values():
        assert s.sha == hashlib.sha1(s.source.encode()).hexdigest()
    assert Script("x", "return 1") == Script("x", "return 1")


def _tuple(*vals: bytes) -> bytes:
    return struct.pack("!h", len(vals)) + b"".join(vals)


def _text(v: str) -> bytes:
    return b"t" + struct.pack("!i", len(v.encode())) + v.encode()


def test_tuple_decoder_rejects_every_kind_of_truncation() -> None:
    rel = (b"R" + struct.pack("!I", 1) + b"public\0users\0f" + struct.pack("!h", 2)
           + b"\x01id\0" + struct.pack("!Ii", 20, -1) + b"\x00name\0" + struct.pack("!Ii", 25, -1))
    begin = b"B" + struct.pack("!QqI", 100, 0, 7)
    good = b"I" + struct.pack("!I", 1) + b"N" + _tuple(_text("1"), _text("ada"))
    dec = PgOutputDecoder()
    dec.feed(rel)
    dec.feed(begin)
    dec.feed(good)
    for cut in range(1, len(good)):
        with pytest.raises(DecodeError):
            dec.feed(good[:cut])
    bad_len = b"I" + struct.pack("!I", 1) + b"N" + _tuple(_text("1"), b"t" + struct.pack("!i", -5) + b"abc")
    with pytest.raises(DecodeError, match="past the end"):
        dec.feed(bad_len)
    with pytest.raises(DecodeError, match="kind"):
        dec.feed(b"I" + struct.pack("!I", 1) + b"N" + _tuple(_text("1"), b"x"))
    with pytest.raises(DecodeError, match="before its Relation"):
        dec.feed(b"I" + struct.pack("!I", 9) + b"N" + _tuple(_text("1"), _text("x")))
    txn = dec.feed(b"C" + struct.pack("!bQQq", 0, 100, 120, 0))
    assert isinstance(txn, Transaction) and [c.after for c in txn.changes] == [{"id": 1, "name": "ada"}]


def _rules(prefix: str) -> Rules:
    return Rules({"users": TableRule(keys=["user:{id}", "user:email:{email}"], tags=["tenant:{t}"],
                                     action="update"),
                  "orders": TableRule(keys=["order:{id}"], tags=["user-orders:{uid}"])},
                 KeyspaceSettings(prefix=prefix), Defaults())


def _txns() -> list[Transaction]:
    out = []
    for i in range(1, 200):
        u = {"id": i % 50, "email": f"u{i % 50}@x", "t": i % 3, "name": f"n{i}"}
        old = {**u, "email": f"old{i % 50}@x"}
        o = {"id": i % 40, "uid": i % 7}
        changes = [Change(Op.INSERT if i % 3 else Op.UPDATE, "public", "users", old if i % 3 == 0 else None, u),
                   Change(Op.DELETE if i % 5 == 0 else Op.INSERT, "public", "orders",
                          o if i % 5 == 0 else None, None if i % 5 == 0 else o)]
        if i % 17 == 0:
            changes.append(Change(Op.TRUNCATE, "public", "orders"))
        out.append(Transaction(version=1000 + i * 10, changes=changes, position=1000 + i * 10 + 5))
    return out


def _state(r: redis.Redis, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in r.scan_iter(match=f"{prefix}*"):
        name = k.decode()
        if r.type(k) == b"hash":
            h: dict[str, Any] = {f.decode(): v for f, v in r.hgetall(k).items() if f not in (b"g", b"ts", b"run")}
            if "t" in h:  # counters are clock-seeded: compare "records the current counter" instead
                h["t"] = {t: r.get(f"{prefix}#tag:{t}").decode() == c for t, c in json.loads(h["t"]).items()}
            out[name.removeprefix(prefix)] = (h, r.pttl(k) > 0)
    return out


def test_packed_sink_writes_exactly_what_the_pipeline_writes(r: redis.Redis) -> None:
    """Same batches through both paths (including replays and a truncate): same entries, counts, epochs."""
    results: dict[bool, Any] = {}
    for packed in (False, True):
        prefix = unique("hp") + ":"
        rules = _rules(prefix)
        sink = RedisSink(r, rules, Sequencer("cdcd", run="fixed"))
        sink.packed = packed
        sink.prepare()
        txns = _txns()
        counts = [sink.apply(rules.plan(txns[i:i + 25])) for i in range(0, len(txns), 25)]
        counts += [sink.apply(rules.plan(txns[:60]))]  # a replay: every write refused
        state = _state(r, prefix)
        results[packed] = ([(c.applied, c.refused, c.tombstones, c.values, c.tags, c.messages) for c in counts],
                           state, {k: int(v) > 0 for k, v in sink.epochs.items()})
    assert results[True] == results[False]
    assert results[True][0][-1][0] == 0  # the replay applied nothing
