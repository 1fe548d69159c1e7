"""Kafka (Debezium) source: a record whose schema lacks a column a rule needs breaks that rule loudly and safely.

Debezium writes every column of the table version into ``before``/``after`` (and their envelope schema), so
after ``ALTER TABLE users DROP COLUMN email`` its records for users have no ``email`` field: the old
``user:email:*`` keys can no longer be named. The daemon must bump the users table tag at that record's
version (every entry derived from users stops validating), turn not ready with the reason, count it, and
keep applying other tables. Records are hand-made in the Debezium JSON format of test_daemon_kafka.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
from kafka import KafkaProducer

from cdcd.devservers import KafkaServer, RedisServer
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until
from tests.kafka.conftest import FAST_GROUP
from tests.kafka.test_daemon_kafka import USER_FIELDS, user, user_event

ORDER_FIELDS = [
    {"type": "int64", "optional": False, "field": "id"},
    {"type": "int64", "optional": False, "field": "user_id"},
    {"type": "int32", "optional": False, "field": "tenant_id"},
]


def event(table: str, fields: list[dict[str, Any]], op: str, lsn: int, after: dict[str, Any]) -> bytes:
    row = {"type": "struct", "optional": True, "fields": fields}
    schema = {"type": "struct", "fields": [{**row, "field": "before"}, {**row, "field": "after"},
                                           {"type": "struct", "fields": [], "field": "source"},
                                           {"type": "string", "field": "op"}]}
    payload = {"before": None, "after": after, "op": op, "ts_ms": 1,
               "source": {"connector": "postgresql", "schema": "public", "table": table, "lsn": lsn,
                          "txId": lsn, "ts_ms": 1_700_000_000_000}}
    return json.dumps({"schema": schema, "payload": payload}).encode()


def _valid(r: redis.Redis, key: str) -> bool:
    e = entry(r, key)
    if "d" not in e:
        return False
    prefix = key[:key.index(":") + 1]
    return all(r.get(f"{prefix}#tag:{t}") == str(c).encode() for t, c in json.loads(e["t"]).items())


def test_debezium_record_without_a_key_column_breaks_the_rule_loudly(
        make_topic: Callable[..., str], producer: KafkaProducer, kafka_server: KafkaServer,
        redis_server: RedisServer) -> None:
    prefix = unique("ks") + ":"
    server = unique("dbserver")
    users, orders = make_topic(name=f"{server}.public.users"), make_topic(name=f"{server}.public.orders")
    producer.send(users, key=b'{"id": 1}', value=user_event("c", 100, None, user(1, "ada@example.com")))
    producer.flush()

    config = make_config(config_dict("postgresql://unused/none", redis_server.url, "unused", prefix))
    settings = KafkaSourceSettings.model_validate({
        "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"), "topics": [users, orders],
        **FAST_GROUP})
    runner = DaemonThread(config, KafkaSource(settings)).start(wait=False)
    daemon = runner.daemon
    r = redis.Redis.from_url(redis_server.url)
    table_tag = f"{prefix}#tag:#table:public.users"
    try:
        wait_until(lambda: _valid(r, f"{prefix}user:email:ada@example.com"), 30, what="user cached")
        assert daemon.readiness()[0]
        tag0 = int(r.get(table_tag) or 0)
        # ALTER TABLE users DROP COLUMN email: Debezium's next users record has no email field
        no_email = [f for f in USER_FIELDS if f["field"] != "email"]
        after = {k: v for k, v in user(1, "x").items() if k != "email"} | {"name": "Bea"}
        producer.send(users, key=b'{"id": 1}', value=event("users", no_email, "u", 200, after))
        producer.flush()
        wait_until(lambda: not _valid(r, f"{prefix}user:email:ada@example.com"), 30,
                   what="everything derived from users invalidated by its table tag")
        assert int(r.get(table_tag)) > tag0
        ready, reasons = daemon.readiness()
        assert not ready and any("tables.public.users" in x and "['email']" in x
                                 and "'user:email:{email}'" in x for x in reasons), reasons
        assert not any("REPLICA IDENTITY" in x for x in reasons)
        assert daemon.metrics.schema_changes.labels("public.users", "column_lost")._value.get() == 1
        # other tables keep flowing; later users records only bump the users tag
        tag1 = int(r.get(table_tag))
        producer.send(orders, key=b'{"id": 10}', value=event("orders", ORDER_FIELDS, "c", 300,
                                                             {"id": 10, "user_id": 1, "tenant_id": 7}))
        producer.send(users, key=b'{"id": 2}', value=event("users", no_email, "c", 400, after | {"id": 2}))
        producer.flush()
        wait_until(lambda: int(entry(r, f"{prefix}order:10").get("v", 0)) == 300, 30, what="orders applied")
        wait_until(lambda: int(r.get(table_tag)) > tag1, 30, what="later users record bumps the tag again")
        assert not entry(r, f"{prefix}user:2")  # never a value from a record the rules cannot map
    finally:
        runner.stop()
    assert runner.error is None, runner.error
