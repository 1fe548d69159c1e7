"""pgoutput decoding on hand-built frames (pure logic; the e2e tests cover real server output)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from cdcd.change import UNAVAILABLE, Op, Rejected, Transaction
from cdcd.pg.pgoutput import DecodeError, PgOutputDecoder, lsn_to_str, parse_invalidation, str_to_lsn


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def begin(final_lsn: int, xid: int = 7) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, 0, xid)


def commit(lsn: int, end: int, ts_us: int = 86_400_000_000) -> bytes:
    return b"C" + struct.pack("!bQQq", 0, lsn, end, ts_us)


def relation(oid: int, cols: list[tuple[str, int, bool]], ident: bytes = b"f") -> bytes:
    out = b"R" + struct.pack("!I", oid) + s("public") + s("users") + ident + struct.pack("!h", len(cols))
    for name, typ, key in cols:
        out += struct.pack("!b", 1 if key else 0) + s(name) + struct.pack("!Ii", typ, -1)
    return out


def tup(*vals: str | bytes | None) -> bytes:
    out = struct.pack("!h", len(vals))
    for v in vals:
        if v is None:
            out += b"n"
        elif v == b"u":
            out += b"u"
        else:
            assert isinstance(v, str)
            out += b"t" + struct.pack("!i", len(v.encode())) + v.encode()
    return out


COLS = [("id", 20, True), ("email", 25, False), ("bal", 1700, False), ("ts", 1184, False), ("ok", 16, False)]


def feed_all(dec: PgOutputDecoder, *frames: bytes) -> list[Transaction | Rejected]:
    out = []
    for f in frames:
        item = dec.feed(f)
        if item is not None:
            out.append(item)
    return out


def test_insert_update_delete_in_one_transaction_arrive_at_commit() -> None:
    dec = PgOutputDecoder()
    frames = [
        relation(1, COLS), begin(100),
        b"I" + struct.pack("!I", 1) + b"N" + tup("1", "a@x", "1.50", "2024-01-02 03:04:05+00", "t"),
        b"U" + struct.pack("!I", 1) + b"O" + tup("1", "a@x", "1.50", "2024-01-02 03:04:05+00", "t")
        + b"N" + tup("1", "b@x", "2.00", "2024-01-02 03:04:05.5+00", "f"),
        b"D" + struct.pack("!I", 1) + b"O" + tup("1", "b@x", "2.00", "2024-01-02 03:04:05.5+00", "f"),
    ]
    assert feed_all(dec, *frames) == []  # nothing before commit
    assert dec.in_transaction
    (txn,) = feed_all(dec, commit(100, 120))
    assert isinstance(txn, Transaction)
    assert txn.version == 100 and txn.position == 120 and txn.xid == 7
    assert txn.commit_time == datetime(2000, 1, 2, tzinfo=UTC)
    ins, upd, dele = txn.changes
    assert ins.op is Op.INSERT and ins.after == {"id": 1, "email": "a@x", "bal": Decimal("1.50"),
                                                   "ts": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "ok": True}
    assert upd.op is Op.UPDATE and upd.before is not None and upd.before["email"] == "a@x"
    assert upd.after is not None and upd.after["email"] == "b@x" and upd.after["ok"] is False
    assert dele.op is Op.DELETE and dele.after is None and dele.before is not None and dele.before["id"] == 1


def test_old_key_tuple_marks_non_key_columns_unavailable_not_null() -> None:
    dec = PgOutputDecoder()
    (txn,) = feed_all(dec, relation(1, COLS, b"d"), begin(5),
                      b"D" + struct.pack("!I", 1) + b"K" + tup("9", None, None, None, None), commit(5, 6))
    before = txn.changes[0].before  # type: ignore[union-attr]
    assert before == {"id": 9, "email": UNAVAILABLE, "bal": UNAVAILABLE, "ts": UNAVAILABLE, "ok": UNAVAILABLE}


def test_unchanged_toast_is_taken_from_the_old_row_when_there_is_one() -> None:
    dec = PgOutputDecoder()
    upd_full = (b"U" + struct.pack("!I", 1) + b"O" + tup("1", "big", "1", "2024-01-01 00:00:00+00", "t")
                + b"N" + tup("1", b"u", "2", "2024-01-01 00:00:00+00", "t"))
    upd_default = b"U" + struct.pack("!I", 1) + b"N" + tup("1", b"u", "3", "2024-01-01 00:00:00+00", "t")
    (txn,) = feed_all(dec, relation(1, COLS), begin(5), upd_full, upd_default, commit(5, 6))
    assert txn.changes[0].after["email"] == "big"  # type: ignore[index]
    assert txn.changes[1].after["email"] is UNAVAILABLE  # type: ignore[index]


def test_truncate_and_messages() -> None:
    dec = PgOutputDecoder()
    msg = b'{"keys": ["a"], "tags": ["t"]}'
    frames = [relation(1, COLS), begin(50), b"T" + struct.pack("!ibI", 1, 0, 1),
              b"M" + struct.pack("!bQ", 1, 40) + s("cdcd") + struct.pack("!i", len(msg)) + msg,
              b"M" + struct.pack("!bQ", 1, 41) + s("other-app") + struct.pack("!i", 2) + b"xx"]
    assert feed_all(dec, *frames) == []
    (txn,) = feed_all(dec, commit(50, 60))
    assert [c.op for c in txn.changes] == [Op.TRUNCATE]  # type: ignore[union-attr]
    assert txn.invalidations[0].keys == ["a"] and txn.invalidations[0].tags == ["t"]  # type: ignore[union-attr]
    # non-transactional: its own transaction at the message's LSN
    (t2,) = feed_all(dec, b"M" + struct.pack("!bQ", 0, 70) + s("cdcd") + struct.pack("!i", len(msg)) + msg)
    assert isinstance(t2, Transaction) and t2.version == 70 and t2.position == 70
    # malformed content: a Rejected with the position, never an exception or a silent drop
    (bad,) = feed_all(dec, b"M" + struct.pack("!bQ", 0, 80) + s("cdcd") + struct.pack("!i", 3) + b"{x}")
    assert isinstance(bad, Rejected) and bad.position == 80 and "not JSON" in bad.reason


@pytest.mark.parametrize("frame, error", [
    (b"Z", "unknown pgoutput message type"),
    (b"I" + struct.pack("!I", 99) + b"N", "before its Relation message"),
    (b"B" + b"\x00\x01", "truncated message"),
])
def test_malformed_frames_raise_decode_error(frame: bytes, error: str) -> None:
    dec = PgOutputDecoder()
    if not frame.startswith(b"B"):
        dec.feed(begin(1))
    with pytest.raises(DecodeError, match=error):
        dec.feed(frame)


def test_unknown_types_pass_through_as_text_and_bad_values_do_not_crash() -> None:
    dec = PgOutputDecoder()
    cols = [("id", 20, True), ("net", 869, False), ("ts", 1114, False), ("n", 1700, False)]
    (txn,) = feed_all(dec, relation(1, cols), begin(1),
                      b"I" + struct.pack("!I", 1) + b"N" + tup("1", "10.0.0.0/8", "infinity", "NaN"), commit(1, 2))
    after = txn.changes[0].after  # type: ignore[union-attr]
    assert after["net"] == "10.0.0.0/8" and after["ts"] == "infinity" and after["n"].is_nan()


def test_lsn_text_roundtrip_and_invalidation_parsing() -> None:
    assert lsn_to_str(str_to_lsn("16/B374D848")) == "16/B374D848"
    assert str_to_lsn("1/0") == 1 << 32
    with pytest.raises(ValueError, match="lists of strings"):
        parse_invalidation(b'{"keys": [1]}')
    with pytest.raises(ValueError, match="expected an object"):
        parse_invalidation(b'{"key": ["a"]}')


def _insert(i: int) -> bytes:
    return b"I" + struct.pack("!I", 1) + b"N" + tup(str(i), f"u{i}@x", "1.00", None, "t")


def test_degrades_past_the_change_cap_and_keeps_only_table_counts() -> None:
    dec = PgOutputDecoder(max_changes=3)
    dec.feed(relation(1, COLS))
    dec.feed(begin(100))
    peak = 0
    for i in range(10):
        dec.feed(_insert(i))
        peak = max(peak, dec.buffered)
    dec.feed(b"T" + struct.pack("!ib", 1, 0) + struct.pack("!I", 1))  # a truncate once degraded: counted
    (txn,) = feed_all(dec, commit(120, 130))
    assert isinstance(txn, Transaction) and txn.degraded
    assert peak == 3 and txn.changes == [] and txn.touched == {("public", "users"): 11}
    dec.feed(begin(200))  # the next transaction starts fresh
    dec.feed(_insert(99))
    (small,) = feed_all(dec, commit(210, 220))
    assert isinstance(small, Transaction) and not small.degraded and len(small.changes) == 1


def test_degrades_past_the_byte_cap() -> None:
    dec = PgOutputDecoder(max_changes=1000, max_bytes=len(_insert(1)) * 2)
    dec.feed(relation(1, COLS))
    dec.feed(begin(100))
    for i in range(5):
        dec.feed(_insert(i))
    (txn,) = feed_all(dec, commit(120, 130))
    assert isinstance(txn, Transaction) and txn.touched == {("public", "users"): 5}
