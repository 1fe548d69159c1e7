"""Real Postgres output: decoding only the columns the rules read plans what decoding every column plans.

The pgoutput frames come from a real server (``pg_logical_slot_peek_binary_changes``, the session pinned to the
text formats the daemon's replication session uses): out-of-line TOAST values left unchanged by an update, a
key-column update under the default replica identity, NULLs, a generated column, a table without rules, a
column added mid-stream and a truncate. The daemon's source decodes this way (``PostgresSource`` sets
``decoder.reads``), so the spine tests cover it too; this test compares both decoders on the same bytes.
"""

from __future__ import annotations

from typing import Any

import psycopg

from cdcd.change import Transaction
from cdcd.pg.pgoutput import PgOutputDecoder
from cdcd.rules import Batch, Defaults, KeyspaceSettings, Rules, TableRule
from tests.helpers import unique

SCHEMA = """
CREATE TABLE wide (id bigint PRIMARY KEY, email text, tenant int, big text, n numeric, ts timestamptz, j jsonb,
                   g int GENERATED ALWAYS AS (tenant * 2) STORED, b bytea, f float8, note text);
ALTER TABLE wide REPLICA IDENTITY FULL;
ALTER TABLE wide ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE keyed (id bigint PRIMARY KEY, code text, t int, pad text);
CREATE TABLE whole (id bigint PRIMARY KEY, body text, meta jsonb);
ALTER TABLE whole REPLICA IDENTITY FULL;
ALTER TABLE whole ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE other (id bigint PRIMARY KEY, x text);
"""

WORKLOAD = [
    "INSERT INTO wide (id, email, tenant, big, n, ts, j, b, f, note) VALUES "
    "(1, 'a@x', 7, repeat('0123456789', 1000), 1.50, '2024-01-02 03:04:05+02', '{\"a\": [1, 2]}', '\\xdead', "
    "0.1, 'x'), (2, 'weird:#%{}', NULL, NULL, 'NaN', 'infinity', 'null', NULL, 'NaN', NULL)",
    "UPDATE wide SET note = 'y' WHERE id = 1",  # big: unchanged out-of-line TOAST ('u'), taken from the old row
    "UPDATE wide SET email = 'b@x', big = big || '!' WHERE id = 1",
    "INSERT INTO keyed VALUES (1, 'c1', 3, 'p'), (2, NULL, NULL, NULL)",
    "UPDATE keyed SET code = 'c2' WHERE id = 1",  # key column change, default identity: old code unknown
    "UPDATE keyed SET id = 10 WHERE id = 2",  # primary key change: old key tuple ('K')
    "DELETE FROM keyed WHERE id = 10",
    "INSERT INTO whole VALUES (1, repeat('abcdefghij', 1000), '{\"k\": 1}')",
    "UPDATE whole SET meta = '{\"k\": 2}' WHERE id = 1",  # whole-row projection with an unchanged TOAST value
    "INSERT INTO other VALUES (1, 'no rule')",
    "UPDATE other SET x = 'still none' WHERE id = 1",
    "ALTER TABLE wide ADD COLUMN extra text DEFAULT 'e'",  # a new shape mid-stream: a new Relation message
    "UPDATE wide SET tenant = 8 WHERE id = 1",
    "DELETE FROM wide WHERE id = 2",
    "TRUNCATE keyed",
    "INSERT INTO keyed VALUES (3, 'c3', 4, 'q')",
]


def _rules() -> Rules:
    return Rules({
        "wide": TableRule(keys=["w:{id}", "w:email:{email}"], tags=["tenant:{tenant}"], action="update",
                          columns=["id", "email", "big", "n", "ts", "j", "b", "f"]),
        "keyed": TableRule(keys=["k:{id}", "code:{code}"], tags=["t:{t}"]),
        "whole": TableRule(keys=["doc:{id}"], action="update"),
    }, KeyspaceSettings(prefix="v1:"), Defaults())


def _decode(frames: list[bytes], rules: Rules | None) -> list[Transaction]:
    dec = PgOutputDecoder("test")
    if rules is not None:
        dec.reads = rules.reads
    out = []
    for f in frames:
        item = dec.feed(f)
        if isinstance(item, Transaction):
            out.append(item)
    return out


def _batch(b: Batch) -> Any:
    return ({k: (w.version, w.data, w.ttl_ms, w.table_tag) for k, w in b.writes.items()}, b.tags, dict(b.counts),
            [(p.kind, p.relation, p.detail) for p in b.problems], b.floors)


def test_real_pgoutput_pruned_and_full_decoding_plan_the_same(app_db: str) -> None:
    slot = unique("dr")
    with psycopg.connect(app_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(f"CREATE PUBLICATION {slot} FOR TABLE wide, keyed, whole, other")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        for stmt in WORKLOAD:
            conn.execute(stmt)
        conn.execute("SET DateStyle = ISO; SET TimeZone = UTC; SET extra_float_digits = 3; SET bytea_output = hex")
        frames = [bytes(row[0]) for row in conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
            "'publication_names', %s)", (slot, slot))]
    rules = _rules()
    full, pruned = _decode(frames, None), _decode(frames, rules)
    assert len(full) == len(WORKLOAD) - 1  # every statement but the ALTER is one transaction
    for f, p in zip(full, pruned, strict=True):  # one transaction at a time, then all of them together
        assert _batch(rules.plan([p])) == _batch(rules.plan([f]))
    assert _batch(rules.plan(pruned)) == _batch(rules.plan(full))

    # the cases this test is about really happened
    toast_update = pruned[1].changes[0]
    assert toast_update.after is not None and toast_update.after["big"] == "0123456789" * 1000
    # an unsent value in the new row: the old row was decoded again with the new row's columns to fill it
    assert toast_update.before is not None and "big" in toast_update.before and "note" not in toast_update.before
    plain_update = pruned[2].changes[0]  # no unsent value: the old row is decoded for the templates only
    assert plain_update.before is not None and set(plain_update.before) == {"id", "email", "tenant"}
    written = rules.plan([pruned[1]]).writes["v1:w:1"].data
    assert written is not None and b"0123456789" * 1000 in written
    whole = rules.plan([pruned[8]]).writes["v1:doc:1"].data
    assert whole is not None and b"abcdefghij" * 1000 in whole and b'"meta":{"k":2}' in whole
    assert rules.plan([pruned[4]]).problems == []  # code change without the old code: warned at startup only
    assert "v1:k:2" in rules.plan([pruned[5]]).writes  # the old primary key's entry is invalidated
    assert full[0].changes[0].after is not None and "note" in full[0].changes[0].after
    assert pruned[0].changes[0].after is not None and "note" not in pruned[0].changes[0].after
    assert pruned[9].changes[0].after == {}  # a table without rules: nothing decoded, still counted
    assert rules.plan([pruned[9]]).problems[0].kind == "unmapped_table"
