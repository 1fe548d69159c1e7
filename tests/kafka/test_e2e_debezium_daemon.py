"""The whole Debezium path: Postgres -> real Debezium -> Kafka (tansu) -> cdcd -> Redis + backplane."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from kafka import KafkaProducer

from cdcd.devservers import KafkaServer, RedisServer
from tests.helpers import (
    Backplane,
    DaemonProcess,
    DaemonThread,
    config_dict,
    db_users,
    entry,
    make_config,
    stale_users,
    unique,
    wait_until,
)
from tests.kafka.conftest import FAST_GROUP
from tests.kafka.debezium_bridge import DebeziumBridge
from tests.test_faults import Writer

pytestmark = [pytest.mark.debezium, pytest.mark.slow]  # a JVM and the Debezium engine per test


def kafka_cfg(app_db: str, redis_url: str, kafka: KafkaServer, topic_prefix: str, prefix: str,
              client: str = "kafka-python") -> dict[str, Any]:
    data = config_dict(app_db, redis_url, "unused", prefix)
    data["source"] = {"type": "kafka", "bootstrap_servers": [kafka.bootstrap], "group_id": unique("g"),
                      "topic_pattern": f"^{topic_prefix}\\..*", "dead_letter_topic": unique("dlq."),
                      "auto_offset_reset": "earliest", "metadata_max_age_ms": 1000, "client": client, **FAST_GROUP}
    data["daemon"]["dead_letters"] = "kafka"
    return data


def precreate(make_topic: Callable[..., str], topic_prefix: str) -> None:
    """Topics exist before the daemon subscribes (one partition each, as the deployment docs recommend).

    Observed with tansu + kafka-python: a pattern subscription does not pick up topics created after the
    group formed, even with a short metadata_max_age_ms. Production connectors create topics once; new
    tables need a restart or a topics list until this is understood.
    """
    for t in ("public.users", "public.orders", "message"):
        make_topic(partitions=1, name=f"{topic_prefix}.{t}")


def read_topic(kafka: KafkaServer, topic: str, n: int, timeout: float = 20) -> list[Any]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=int(timeout * 1000), group_id=None)
    out = []
    for rec in c:
        out.append(rec)
        if len(out) >= n:
            break
    c.close()
    return out


def test_debezium_changes_through_the_daemon(app_db: str, sql: Any, redis_server: RedisServer, r: redis.Redis,
                                             kafka_server: KafkaServer, make_topic: Callable[..., str]) -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'snap@x', 'before the connector', 7)")
    topic_prefix = unique("dbz")
    precreate(make_topic, topic_prefix)
    p = unique("k") + ":"
    bridge = DebeziumBridge(app_db, kafka_server.bootstrap, topic_prefix=topic_prefix, slot=unique("dbzslot"),
                            publication=unique("dbzpub"), snapshot_mode="initial",
                            extra_properties={"message.prefix.include.list": "cdcd"}).start()
    cfg = kafka_cfg(app_db, redis_server.url, kafka_server, topic_prefix, p)
    bp = Backplane(r, f"{p}#cdcd:bp")
    d = DaemonThread(make_config(cfg)).start()
    try:
        # snapshot read ('r') -> not a change, no commit order: a fence (invalidation only, docs/versions.md)
        wait_until(lambda: entry(r, f"{p}user:1"), 60, what="snapshot row")
        assert "d" not in entry(r, f"{p}user:1")
        wait_until(lambda: d.daemon.metrics.fence_writes._value.get() >= 1, 10, what="fence counted")
        # insert, key-column update, delete
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (2, 'a@x', 'A', 7)")
        sql("UPDATE users SET email = 'b@x', tenant_id = 8 WHERE id = 2")
        wait_until(lambda: entry(r, f"{p}user:email:b@x").get("d"), 30, what="update")
        old = entry(r, f"{p}user:email:a@x")
        assert "d" not in old and int(old["v"]) > 0  # the old e-mail key: a versioned tombstone
        assert json.loads(entry(r, f"{p}user:2")["d"])["tenant_id"] == 8
        sql("DELETE FROM users WHERE id = 1")
        wait_until(lambda: entry(r, f"{p}user:1") and "d" not in entry(r, f"{p}user:1"), 30, what="delete")
        # primary-key change: Debezium's delete + create; both keys follow
        sql("UPDATE users SET id = 3 WHERE id = 2")
        wait_until(lambda: entry(r, f"{p}user:3").get("d"), 30, what="pk change create")
        wait_until(lambda: "d" not in entry(r, f"{p}user:2"), 30, what="pk change delete")
        # explicit invalidation inside a transaction (op 'm')
        with psycopg.connect(app_db, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_logical_emit_message(true, 'cdcd', %s)",
                         (json.dumps({"keys": ["report:daily"], "tags": ["dashboard:1"]}),))
            conn.execute("INSERT INTO orders VALUES (1, 3, 8, 9.99, 'new')")
        wait_until(lambda: entry(r, f"{p}report:daily"), 30, what="message invalidation")
        wait_until(lambda: entry(r, f"{p}order:1"), 30, what="order")
        # truncate -> the table tag
        tt = f"{p}#tag:#table:public.orders"
        before = int(r.get(tt) or 0)
        sql("TRUNCATE orders")
        wait_until(lambda: int(r.get(tt) or 0) > before, 30, what="truncate bumped the table tag")
        # backplane: messages in sequence from one run, naming what changed
        assert f"{p}user:email:a@x" in bp.all_keys() and "tenant:8" in bp.all_tags()
        wait_until(lambda: "#table:public.orders" in bp.all_tags(), 5, what="truncate message")
        assert "dashboard:1" in bp.all_tags()
        seqs = bp.seqs()
        assert seqs == list(range(1, len(seqs) + 1))
        # a malformed record on a change topic is dead-lettered, and the next change still applies
        producer = KafkaProducer(bootstrap_servers=kafka_server.bootstrap)
        producer.send(f"{topic_prefix}.public.users", key=b'{"id": 99}', value=b'{"payload": {"op": "c", "after"')
        producer.flush()
        producer.close()
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (4, 'c@x', 'C', 7)")
        wait_until(lambda: entry(r, f"{p}user:4").get("d"), 30, what="change after the malformed record")
        (letter,) = read_topic(kafka_server, cfg["source"]["dead_letter_topic"], 1)
        headers = dict(letter.headers)
        assert headers["cdcd.topic"] == f"{topic_prefix}.public.users".encode() and "cdcd.error" in headers
        assert d.daemon.metrics.dead_letters._value.get() == 1
    finally:
        d.stop()
        bp.close()
        bridge.stop()


def test_debezium_daemon_killed_and_group_member_lost_nothing_lost(
        app_db: str, redis_server: RedisServer, r: redis.Redis, kafka_server: KafkaServer, workdir: Path,
        make_topic: Callable[..., str], kafka_client: str) -> None:
    """SIGKILL a daemon mid-stream (restart it), and run a second daemon in the same group: every change lands."""
    topic_prefix = unique("dbz")
    for t in ("public.users", "public.orders", "message"):  # several partitions: the two daemons share them
        make_topic(partitions=4, name=f"{topic_prefix}.{t}")
    p = unique("k") + ":"
    bridge = DebeziumBridge(app_db, kafka_server.bootstrap, topic_prefix=topic_prefix, slot=unique("dbzslot"),
                            publication=unique("dbzpub"), snapshot_mode="no_data").start()
    cfg = kafka_cfg(app_db, redis_server.url, kafka_server, topic_prefix, p, kafka_client)
    first = DaemonProcess(cfg, workdir).start()
    second = DaemonProcess(cfg, workdir).start()
    writer = Writer(app_db, 150, pause=0.005)
    rng = random.Random(3)
    try:
        writer.start()
        time.sleep(rng.uniform(0.5, 1.0))
        first.kill()  # the group rebalances onto the second; uncommitted records are re-delivered
        time.sleep(rng.uniform(0.2, 0.5))
        first = DaemonProcess(cfg, workdir).start()  # and it comes back, joining the group again
        time.sleep(rng.uniform(0.5, 1.0))
        second.kill()
        writer.join(60)
        assert writer.error is None and writer.committed == 300
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(r, p, expected), timeout=90, interval=0.5,
                   what="every Debezium change applied after the kills")
    finally:
        first.stop()
        second.stop()
        bridge.stop()
