"""Decoding only the columns the rules read plans exactly what decoding every column plans.

The decoder skips (neither decodes nor converts) the columns :meth:`Rules.reads` leaves out. These tests
feed the same pgoutput frames to a full decoder and a pruned one and compare the planned batches: random
rows over hostile values, NULLs, unchanged TOAST values, old-key and full old tuples, key-column updates,
a table without rules, a whole-row projection and Relation messages that change a table's shape mid-stream.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from cdcd.change import UNAVAILABLE, Reads, Transaction
from cdcd.pg.pgoutput import DecodeError, PgOutputDecoder
from cdcd.rules import Batch, Defaults, KeyspaceSettings, Rules, TableRule

INT8, INT4, TEXT, NUMERIC, TSTZ, JSONB, BOOL = 20, 23, 25, 1700, 1184, 3802, 16

# oid -> (table, replica identity, [(column, type, is_key)])
TABLES: dict[int, tuple[str, bytes, list[tuple[str, int, bool]]]] = {
    1: ("users", b"f", [("id", INT8, True), ("email", TEXT, False), ("name", TEXT, False), ("tenant_id", INT4, False),
                        ("updated_at", TSTZ, False), ("bio", TEXT, False), ("bal", NUMERIC, False)]),
    2: ("orders", b"d", [("id", INT8, True), ("user_id", INT8, False), ("tenant_id", INT4, False),
                         ("total", NUMERIC, False), ("status", TEXT, False), ("note", JSONB, False)]),
    3: ("docs", b"f", [("id", INT8, True), ("body", TEXT, False), ("meta", JSONB, False), ("ok", BOOL, False)]),
    4: ("audit", b"d", [("id", INT8, True), ("what", TEXT, False)]),  # no rule
}
# mid-stream shapes: users loses bal and gains nick; orders loses user_id (a needed column: a stale shape)
RESHAPED: dict[int, tuple[str, bytes, list[tuple[str, int, bool]]]] = {
    1: ("users", b"f", [("id", INT8, True), ("nick", TEXT, False), ("email", TEXT, False), ("name", TEXT, False),
                        ("tenant_id", INT4, False), ("updated_at", TSTZ, False), ("bio", TEXT, False)]),
    2: ("orders", b"d", [("id", INT8, True), ("tenant_id", INT4, False), ("total", NUMERIC, False),
                         ("status", TEXT, False), ("note", JSONB, False)]),
}


def _rules() -> Rules:
    return Rules({
        "users": TableRule(keys=["user:{id}", "user:email:{email}"], tags=["tenant:{tenant_id}"], action="update",
                           columns=["id", "email", "name", "tenant_id"]),
        "orders": TableRule(keys=["order:{id}", "pair:{user_id}:{tenant_id}"], tags=["user-orders:{user_id}"]),
        "docs": TableRule(keys=["doc:{id}"], action="update"),  # the whole row is the projection
    }, KeyspaceSettings(prefix="v1:"), Defaults())


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def relation(oid: int, shape: tuple[str, bytes, list[tuple[str, int, bool]]]) -> bytes:
    table, ident, cols = shape
    out = b"R" + struct.pack("!I", oid) + _s("public") + _s(table) + ident + struct.pack("!h", len(cols))
    for name, typ, key in cols:
        out += struct.pack("!b", 1 if key else 0) + _s(name) + struct.pack("!Ii", typ, -1)
    return out


def tup(vals: list[Any]) -> bytes:
    """None: 'n'; UNAVAILABLE: 'u'; bytes: a binary 'b' value; str: a text value."""
    out = struct.pack("!h", len(vals))
    for v in vals:
        if v is None:
            out += b"n"
        elif v is UNAVAILABLE:
            out += b"u"
        elif isinstance(v, bytes):
            out += b"b" + struct.pack("!i", len(v)) + v
        else:
            out += b"t" + struct.pack("!i", len(v.encode())) + v.encode()
    return out


HOSTILE = ["", ":", "a:b", "#x", "%3A", "{id}", "}{", "Zoë ☃", "\n", " ", "NaN", "1e400", "-0", "null", "{}"]


def _value(rng: random.Random, typ: int, toast: bool) -> Any:
    roll = rng.random()
    if roll < 0.08:
        return None
    if toast and roll < 0.2:
        return UNAVAILABLE
    if roll < 0.25:
        return rng.choice(HOSTILE)  # often not valid for the type: the converter falls back to the text
    if roll < 0.27:
        return b"\x00\xff"
    if typ in (INT8, INT4):
        return str(rng.randrange(-3, 6))
    if typ == NUMERIC:
        return rng.choice(["1.50", "2", "-0.01", "Infinity"])
    if typ == TSTZ:
        return rng.choice(["2024-01-02 03:04:05+00", "2024-01-02 03:04:05.5+00", "infinity"])
    if typ == JSONB:
        return rng.choice(['{"a": [1, 2.5]}', "[]", '"s"', "{bad"])
    if typ == BOOL:
        return rng.choice(["t", "f"])
    return rng.choice(["a", "b@x", "c:d", str(rng.randrange(3))])


def _frames(seed: int, n: int = 400) -> list[bytes]:
    rng = random.Random(seed)
    shapes = dict(TABLES)
    frames = [relation(oid, shape) for oid, shape in shapes.items()]
    version = 100
    for i in range(n):
        if i == n // 2:  # schema changes mid-stream: new Relation messages, then rows of the new shapes
            shapes.update(RESHAPED)
            frames += [relation(oid, shape) for oid, shape in RESHAPED.items()]
        if i % 5 == 0:
            if i:
                frames.append(b"C" + struct.pack("!bQQq", 0, version, version + 1, 0))
            version += 10
            frames.append(b"B" + struct.pack("!QqI", version, 0, i))
        oid = rng.choice(list(shapes))
        _, ident, cols = shapes[oid]
        head = struct.pack("!I", oid)
        kind = "T" if rng.random() < 0.02 else rng.choice("IUUUD")
        if kind == "T":
            frames.append(b"T" + struct.pack("!ib", 1, 0) + head)
            continue
        new = [_value(rng, typ, kind == "U") for _, typ, _ in cols]
        full_old = [_value(rng, typ, False) for _, typ, _ in cols]
        key_old = [v if key else None for v, (_, _, key) in zip(full_old, cols, strict=True)]
        if rng.random() < 0.3:  # the old row shares the new row's values where the new one sent them
            full_old = [o if v is UNAVAILABLE else v for o, v in zip(full_old, new, strict=True)]
        old_tag, old = rng.choice([(b"O", full_old), (b"K", key_old)] if ident == b"f" or rng.random() < 0.5
                                  else [(b"K", key_old)])
        if kind == "I":
            frames.append(b"I" + head + b"N" + tup([v if v is not UNAVAILABLE else None for v in new]))
        elif kind == "D":
            frames.append(b"D" + head + old_tag + tup(old))
        elif rng.random() < 0.3:
            frames.append(b"U" + head + b"N" + tup(new))  # default identity, key unchanged: no old tuple
        else:
            frames.append(b"U" + head + old_tag + tup(old) + b"N" + tup(new))
    frames.append(b"C" + struct.pack("!bQQq", 0, version, version + 1, 0))
    return frames


def _decode(frames: list[bytes], rules: Rules | None) -> list[Transaction]:
    dec = PgOutputDecoder("test")
    if rules is not None:
        dec.reads = rules.reads
    out = []
    for f in frames:
        item = dec.feed(f)
        if item is not None:
            assert isinstance(item, Transaction)
            out.append(item)
    return out


def _batch(b: Batch) -> Any:
    return ({k: (w.version, w.data, w.ttl_ms, w.table_tag, w.fence) for k, w in b.writes.items()},
            b.tags, dict(b.counts), [(p.kind, p.relation, p.detail, p.position) for p in b.problems], b.floors)


@pytest.mark.parametrize("seed", range(12))
def test_pruned_decoding_plans_exactly_what_full_decoding_plans(seed: int) -> None:
    rules = _rules()
    frames = _frames(seed)
    full, pruned = _decode(frames, None), _decode(frames, rules)
    values, problems = 0, set()
    for chunk in (1, 7, len(full)):
        for i in range(0, len(full), chunk):
            want = rules.plan(full[i:i + chunk])
            assert _batch(rules.plan(pruned[i:i + chunk])) == _batch(want)
            values += sum(w.data is not None for w in want.writes.values())
            problems.update(p.kind for p in want.problems)
    assert values > 10  # values were written, not only tombstones
    assert problems == {"unmapped_table", "unresolvable_key"}
    # the pruned rows really are smaller: only what the rules read, with the same values
    skipped = 0
    for ft, pt in zip(full, pruned, strict=True):
        for fc, pc in zip(ft.changes, pt.changes, strict=True):
            for frow, prow in ((fc.after, pc.after), (fc.before, pc.before)):
                assert (frow is None) == (prow is None)
                if frow is not None and prow is not None:
                    assert prow.items() <= frow.items()
                    skipped += len(frow) - len(prow)
    assert skipped > 100


def test_reads_follow_the_rules() -> None:
    rules = _rules()
    assert rules.reads("public", "users") == Reads(frozenset({"id", "email", "name", "tenant_id"}),
                                                   frozenset({"id", "email", "tenant_id"}))
    assert rules.reads("public", "orders") == Reads(frozenset({"id", "user_id", "tenant_id"}),
                                                    frozenset({"id", "user_id", "tenant_id"}))
    assert rules.reads("public", "docs") == Reads(None, frozenset({"id"}))
    assert rules.reads("public", "audit") == Reads(frozenset(), frozenset())


def test_unchanged_toast_in_the_projection_is_taken_from_the_full_old_row() -> None:
    """The old row is decoded for its key columns only, unless the new one has an unsent value to fill."""
    rules = _rules()
    old = tup(["1", "a@x", "big name", "3", "2024-01-02 03:04:05+00", "bio", "1.50"])
    new = tup(["1", "b@x", UNAVAILABLE, "3", "2024-01-02 03:04:05+00", UNAVAILABLE, "1.50"])
    frames = [relation(1, TABLES[1]), b"B" + struct.pack("!QqI", 50, 0, 1),
              b"U" + struct.pack("!I", 1) + b"O" + old + b"N" + new, b"C" + struct.pack("!bQQq", 0, 50, 51, 0)]
    (txn,) = _decode(frames, rules)
    after = txn.changes[0].after
    assert after == {"id": 1, "email": "b@x", "name": "big name", "tenant_id": 3}
    writes = rules.plan([txn]).writes
    assert writes["v1:user:1"].data == b'{"id":1,"email":"b@x","name":"big name","tenant_id":3}'
    assert writes["v1:user:email:a@x"].data is None  # the old e-mail key is dropped


def test_skipped_columns_are_still_checked_for_truncation() -> None:
    rules = _rules()
    dec = PgOutputDecoder()
    dec.reads = rules.reads
    dec.feed(relation(4, TABLES[4]))  # no rule: nothing is read, everything is still walked
    dec.feed(b"B" + struct.pack("!QqI", 50, 0, 1))
    good = b"I" + struct.pack("!I", 4) + b"N" + tup(["1", "what"])
    dec.feed(good)
    for cut in range(1, len(good)):
        with pytest.raises(DecodeError):
            dec.feed(good[:cut])
    with pytest.raises(DecodeError, match="past the end"):
        dec.feed(b"I" + struct.pack("!I", 4) + b"N" + struct.pack("!h", 2) + b"n" + b"t" + struct.pack("!i", -5))
