"""Postgres commit -> slot -> rules -> versioned Redis writes -> backplane, against real servers."""

from __future__ import annotations

import json
from typing import Any

import redis

from tests.helpers import Backplane, DaemonThread, entry, make_config, wait_until


def test_insert_update_delete_truncate(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    p = cfg["keyspace"]["prefix"]
    bp = Backplane(r, f"{p}#cdcd:bp")
    d = DaemonThread(make_config(cfg)).start()
    try:
        # insert: action update -> the projection lands under both keys, the tenant tag is bumped
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'ada@example.com', 'Ada', 7)")
        e = wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="user:1 value")
        value = json.loads(e)
        assert value["id"] == 1 and value["email"] == "ada@example.com" and value["tenant_id"] == 7
        assert value["updated_at"].endswith("+00:00")  # timestamptz decoded and re-encoded as ISO 8601 UTC
        by_email = entry(r, f"{p}user:email:ada@example.com")
        assert by_email["d"] == entry(r, f"{p}user:1")["d"]
        v_insert = int(entry(r, f"{p}user:1")["v"])
        wait_until(lambda: bp.messages, what="backplane message")
        m = bp.messages[0]
        assert m["o"] == "cdcd" and m["s"] >= 1 and int(m["v"]) == v_insert
        assert set(m["k"]) == {f"{p}user:1", f"{p}user:email:ada@example.com"}
        assert m["t"] == ["tenant:7"]
        tag_before = r.get(f"{p}#tag:tenant:7")
        assert tag_before is not None
        # the value records the table tag's counter, so a TRUNCATE invalidates it
        snap = json.loads(entry(r, f"{p}user:1")["t"])
        assert snap == {"#table:public.users": r.get(f"{p}#tag:#table:public.users").decode()}

        # update of a key column: the old e-mail key gets a tombstone, the new one the row
        sql("UPDATE users SET email = 'ada@lovelace.dev', tenant_id = 8 WHERE id = 1")
        wait_until(lambda: len(bp.messages) >= 2, what="second message")
        old = entry(r, f"{p}user:email:ada@example.com")
        assert "d" not in old and int(old["v"]) > v_insert  # tombstone carrying the newer version
        new = json.loads(entry(r, f"{p}user:email:ada@lovelace.dev")["d"])
        assert new["email"] == "ada@lovelace.dev" and new["tenant_id"] == 8
        m = bp.messages[1]
        assert m["s"] > bp.messages[0]["s"]
        assert set(m["k"]) == {f"{p}user:1", f"{p}user:email:ada@example.com", f"{p}user:email:ada@lovelace.dev"}
        assert set(m["t"]) == {"tenant:7", "tenant:8"}  # old and new tag both bumped
        assert int(r.get(f"{p}#tag:tenant:7")) > int(tag_before)

        # delete: every key of the old row becomes a tombstone with the delete's version
        sql("DELETE FROM users WHERE id = 1")
        wait_until(lambda: len(bp.messages) >= 3, what="third message")
        for key in ("user:1", "user:email:ada@lovelace.dev"):
            e = entry(r, f"{p}{key}")
            assert "d" not in e and int(e["v"]) == int(bp.messages[2]["v"])
            assert r.pttl(f"{p}{key}") > 0  # tombstones are short-lived

        # invalidate rule: orders get tombstones, never values; both tags bumped
        sql("INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (10, 1, 7, 12.50, 'new')")
        wait_until(lambda: len(bp.messages) >= 4, what="order message")
        o = entry(r, f"{p}order:10")
        assert "d" not in o and int(o["v"]) > 0
        assert set(bp.messages[3]["t"]) == {"user-orders:1", "tenant:7"}

        # truncate: one bump of the table tag, no scan
        table_tag = f"{p}#tag:#table:public.orders"
        before = int(r.get(table_tag))
        sql("TRUNCATE orders")
        wait_until(lambda: len(bp.messages) >= 5, what="truncate message")
        assert bp.messages[4]["t"] == ["#table:public.orders"] and bp.messages[4]["k"] == []
        assert int(r.get(table_tag)) > before
        seqs = bp.seqs()  # with the idle watermark announcements between the changes
        assert seqs == list(range(1, len(seqs) + 1))  # no gaps, one run
        changes = [m["s"] for m in bp.messages]
        assert len(changes) == 5 and changes == sorted(changes)
        assert len({m["r"] for m in bp.messages}) == 1
        assert d.daemon.metrics.changes.labels("public.users", "c")._value.get() == 1
    finally:
        d.stop()
        bp.close()


def test_update_of_a_row_written_in_one_transaction_keeps_the_last_image(
        cfg: dict[str, Any], r: redis.Redis, app_db: str) -> None:
    """Several changes to one row in one transaction share a version: the last image must win."""
    import psycopg

    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    try:
        with psycopg.connect(app_db) as conn:
            conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (5, 'e@x', 'first', 1)")
            conn.execute("UPDATE users SET name = 'second' WHERE id = 5")
            conn.execute("UPDATE users SET name = 'third' WHERE id = 5")
        wait_until(lambda: entry(r, f"{p}user:5").get("d"), what="user:5")
        assert json.loads(entry(r, f"{p}user:5")["d"])["name"] == "third"
    finally:
        d.stop()


def test_explicit_invalidation_message_in_a_transaction(cfg: dict[str, Any], r: redis.Redis, app_db: str) -> None:
    """pg_logical_emit_message(true, 'cdcd', ...) is applied at its transaction's version, at commit only."""
    import psycopg

    p = cfg["keyspace"]["prefix"]
    bp = Backplane(r, f"{p}#cdcd:bp")
    d = DaemonThread(make_config(cfg)).start()
    try:
        with psycopg.connect(app_db, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_logical_emit_message(true, 'cdcd', %s)",
                             (json.dumps({"keys": ["report:daily"], "tags": ["dashboard:7"]}),))
                conn.execute("INSERT INTO orders VALUES (77, 1, 7, 1.00, 'new')")
            # a rolled-back transaction's message must never be applied
            with conn.transaction():
                conn.execute("SELECT pg_logical_emit_message(true, 'cdcd', %s)",
                             (json.dumps({"keys": ["report:never"]}),))
                conn.execute("INSERT INTO orders VALUES (78, 1, 7, 1.00, 'new')")
                raise psycopg.Rollback()
        wait_until(lambda: entry(r, f"{p}report:daily"), what="report:daily tombstone")
        e = entry(r, f"{p}report:daily")
        assert "d" not in e
        assert e["v"] == entry(r, f"{p}order:77")["v"]  # same transaction, same version
        assert r.get(f"{p}#tag:dashboard:7") is not None
        # a malformed message is dead-lettered and counted, the stream continues
        with psycopg.connect(app_db, autocommit=True) as conn:
            conn.execute("SELECT pg_logical_emit_message(true, 'cdcd', 'not json')")
            conn.execute("INSERT INTO orders VALUES (79, 1, 7, 1.00, 'new')")
        wait_until(lambda: entry(r, f"{p}order:79"), what="order after malformed message")
        dlq = r.xrange(f"{p}#cdcd:dlq")
        assert len(dlq) == 1 and b"malformed cdcd message" in dlq[0][1][b"reason"]
        assert d.daemon.metrics.dead_letters._value.get() == 1
        assert not entry(r, f"{p}report:never")
        assert not entry(r, f"{p}order:78")
    finally:
        d.stop()
        bp.close()


def test_types_render_the_same_keys(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    """numeric, uuid, bool, date, timestamp(tz), jsonb, bytea decode to the values keys and projections expect."""
    sql("""CREATE TABLE kinds (id uuid PRIMARY KEY, n numeric(10,2), b bool, d date, ts timestamp,
           tz timestamptz, j jsonb, raw bytea, i2 smallint, f float8, t text, unknown_type inet)""")
    sql("ALTER TABLE kinds REPLICA IDENTITY FULL")
    cfg["tables"] = {"kinds": {"keys": ["k:{id}", "n:{n}", "b:{b}", "d:{d}", "ts:{ts}", "tz:{tz}", "i:{i2}",
                                        "net:{unknown_type}"], "action": "update"}}
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    try:
        sql("""INSERT INTO kinds VALUES ('6F9619FF-8B86-D011-B42D-00C04FC964FF', 12.50, true, '2024-02-29',
               '2024-02-29 10:11:12.5', '2024-02-29 10:11:12+02', '{"a": [1, 2]}', '\\xdeadbeef', 3, 1.5,
               'x', '10.0.0.1/32')""")
        key = f"{p}k:6f9619ff-8b86-d011-b42d-00c04fc964ff"
        wait_until(lambda: entry(r, key).get("d"), what="kinds row")
        for k in ("n:12.50", "b:true", "d:2024-02-29", "ts:2024-02-29T10%3A11%3A12.500000",  # ':' escaped
                  "tz:2024-02-29T08%3A11%3A12+00%3A00", "i:3", "net:10.0.0.1"):
            assert entry(r, f"{p}{k}").get("d"), k
        row = json.loads(entry(r, key)["d"])
        assert row["n"] == "12.50" and row["b"] is True and row["j"] == {"a": [1, 2]}
        assert row["raw"] == "3q2+7w==" and row["f"] == 1.5 and row["i2"] == 3
    finally:
        d.stop()
