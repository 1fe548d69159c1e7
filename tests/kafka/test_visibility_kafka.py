"""The Kafka source's optional visibility check (``visibility_check_dsn``, docs/kafka.md#visibility).

Debezium reads the same WAL as cdcd's Postgres source, so it can publish a commit other sessions cannot
see yet. Here a transaction is held invisible by a synchronous standby that never answers, and a
Debezium-shaped record carrying its xid (``source.txId``, 32 bits as Debezium sends it) is produced by
hand (the shapes test_real_debezium.py checks against the real connector): the daemon must not apply it,
nor a later record behind it, until the commit is visible.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
import redis
from kafka import KafkaProducer

from cdcd.devservers import KafkaServer, PostgresServer, RedisServer
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until
from tests.kafka.conftest import FAST_GROUP
from tests.kafka.test_daemon_kafka import user, user_event, version


def _with_txid(record: bytes, xid: int) -> bytes:
    doc = json.loads(record)
    doc["payload"]["source"]["txId"] = xid
    return json.dumps(doc).encode()


@pytest.mark.slow
@pytest.mark.parametrize("max_poll", [5000, 1])  # 1: the held record fills the gate, so the consumer pauses
def test_a_record_of_an_invisible_commit_waits_and_so_does_the_next(
        own_pg: PostgresServer, make_topic: Callable[..., str], producer: KafkaProducer,
        kafka_server: KafkaServer, redis_server: RedisServer, kafka_client: str, max_poll: int) -> None:
    dsn = own_pg.create_database(unique("kv"))
    admin = psycopg.connect(dsn, autocommit=True)
    writer = psycopg.connect(dsn)
    admin.execute("CREATE TABLE t (x int)")
    visible_xid = int(admin.execute("SELECT pg_current_xact_id()::text::bigint % 4294967296").fetchone()[0])  # type: ignore[index]
    prefix, topic = unique("kv") + ":", make_topic(name=f"{unique('dbserver')}.public.users")
    settings = KafkaSourceSettings.model_validate({
        "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"), "topics": [topic],
        "visibility_check_dsn": dsn, "client": kafka_client, "max_poll_records": max_poll, **FAST_GROUP})
    config = make_config(config_dict("postgresql://unused/none", redis_server.url, "unused", prefix))
    runner = DaemonThread(config, KafkaSource(settings))
    runner.start(wait=False)
    r = redis.Redis.from_url(redis_server.url)
    try:
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        admin.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        writer.execute("INSERT INTO t VALUES (1)")
        xid = int(writer.execute("SELECT pg_current_xact_id()::text::bigint % 4294967296").fetchone()[0])  # type: ignore[index]

        def commit() -> None:
            with contextlib.suppress(psycopg.Error):
                writer.commit()  # flushed, then waits for the standby: invisible
        t = threading.Thread(target=commit, daemon=True)
        t.start()
        time.sleep(0.3)
        key1, key2 = json.dumps({"id": 1}).encode(), json.dumps({"id": 2}).encode()
        producer.send(topic, key=key1, value=_with_txid(user_event("c", 100, None, user(1, "a@example.com")), xid))
        producer.send(topic, key=key2, value=_with_txid(user_event("c", 200, None, user(2, "b@example.com")),
                                                        visible_xid))  # visible, but after the held one
        producer.flush()
        wait = wait_until(lambda: runner.daemon.status()["waiting_for_visibility"], 30, what="record held")
        assert wait["xid"] == xid
        time.sleep(1.0)
        assert entry(r, f"{prefix}user:1") == {} and entry(r, f"{prefix}user:2") == {}
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")
        wait_until(lambda: entry(r, f"{prefix}user:2").get("v"), 15, what="both applied once visible")
        assert int(entry(r, f"{prefix}user:1")["v"]) == version(100)
        assert int(entry(r, f"{prefix}user:2")["v"]) == version(200)
        waits = runner.daemon.metrics.registry.get_sample_value("cdcd_source_visibility_waits_total")
        assert waits is not None and waits >= 1
        t.join(10)
    finally:
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")
        runner.stop()
        admin.close()
        writer.close()
    assert runner.error is None, runner.error
