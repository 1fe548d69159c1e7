"""A TRUNCATE is never overtaken by an older insert from another partition (issue 15, item 7).

Kafka (tansu) with a two-partition table topic and ``cdcd`` in a thread against real Redis: the truncate
(LSN 2000) arrives on partition 0 and is applied; then an insert committed before it (LSN 1500) arrives on
partition 1. The key must not hold a valid value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
from kafka import KafkaProducer

from cdcd.client import Cache, CacheOptions
from cdcd.devservers import KafkaServer, RedisServer
from cdcd.keyspace import Keyspace
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until
from tests.kafka.conftest import FAST_GROUP


def _record(op: str, lsn: int, after: dict[str, Any] | None) -> bytes:
    return json.dumps({"before": None, "after": after, "op": op, "ts_ms": 1,
                       "source": {"connector": "postgresql", "schema": "public", "table": "users", "lsn": lsn,
                                  "txId": lsn, "ts_ms": 1}}).encode()


def test_truncate_not_overtaken_by_older_insert_on_another_partition(
        redis_server: RedisServer, r: redis.Redis, kafka_server: KafkaServer, make_topic: Callable[..., str],
        producer: KafkaProducer) -> None:
    topic = make_topic(partitions=2, name=unique("dbz") + ".public.users")
    p = unique("k") + ":"
    data = config_dict("postgresql://unused", redis_server.url, "unused", p)
    data["source"] = {"type": "kafka", "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"),
                      "topics": [topic], "auto_offset_reset": "earliest", **FAST_GROUP}
    data["daemon"]["dead_letters"] = "redis"
    d = DaemonThread(make_config(data)).start()
    try:
        producer.send(topic, key=None, value=_record("t", 2000, None), partition=0)
        producer.flush()
        wait_until(lambda: r.hget(Keyspace(p).applied, "version") == b"2000", 30, what="truncate applied")
        row = {"id": 7, "email": "late@x", "name": "before the truncate", "tenant_id": 1,
               "updated_at": "2026-01-01T00:00:00Z"}
        producer.send(topic, key=json.dumps({"id": 7}).encode(), value=_record("c", 1500, row), partition=1)
        producer.flush()
        wait_until(lambda: entry(r, f"{p}user:7").get("v") == "1500", 30, what="late insert applied")
        with Cache(redis_server.url, CacheOptions(prefix=p, subscribe=False)) as c:
            assert c.get("user:7") is None  # main: the pre-truncate row is served as valid
            assert c.get("user:email:late@x") is None
        assert "d" not in entry(r, f"{p}user:7")
        assert r.hget(Keyspace(p).floors, "public.users") == b"2000"
    finally:
        d.stop()
