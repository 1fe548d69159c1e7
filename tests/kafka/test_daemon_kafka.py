"""The daemon loop with KafkaSource: Debezium records in Kafka -> versioned Redis writes -> committed offsets.

Records here are hand-made (schemas.enable=true, the shapes test_real_debezium.py
checks against the real connector) so the loop is tested without the JVM. The
lead's end-to-end test drives the same path from real Debezium via the bridge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
from kafka import KafkaProducer

from cdcd.devservers import KafkaServer, RedisServer
from cdcd.sinks.kafka_dlq import KafkaDeadLetters
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until
from tests.kafka.conftest import FAST_GROUP
from tests.kafka.test_dead_letters import read_all
from tests.kafka.test_kafka_source import committed

USER_FIELDS = [
    {"type": "int64", "optional": False, "field": "id"},
    {"type": "string", "optional": False, "field": "email"},
    {"type": "string", "optional": False, "field": "name"},
    {"type": "int32", "optional": False, "field": "tenant_id"},
    {"type": "string", "optional": False, "name": "io.debezium.time.ZonedTimestamp", "field": "updated_at"},
]


def user_event(op: str, lsn: int, before: dict[str, Any] | None, after: dict[str, Any] | None) -> bytes:
    row = {"type": "struct", "optional": True, "fields": USER_FIELDS}
    schema = {"type": "struct", "fields": [{**row, "field": "before"}, {**row, "field": "after"},
                                           {"type": "struct", "fields": [], "field": "source"},
                                           {"type": "string", "field": "op"}]}
    payload = {"before": before, "after": after, "op": op, "ts_ms": 1,
               "source": {"connector": "postgresql", "schema": "public", "table": "users", "lsn": lsn,
                          "sequence": json.dumps([str(lsn - 1), str(lsn)]),
                          "txId": lsn, "ts_ms": 1_700_000_000_000}}
    return json.dumps({"schema": schema, "payload": payload}).encode()


def version(lsn: int) -> int:
    """The version user_event's source.sequence ["lsn - 1", "lsn"] stands for (docs/versions.md)."""
    return (lsn - 1) * 2**64 + lsn


def user(id_: int, email: str, tenant: int = 7) -> dict[str, Any]:
    return {"id": id_, "email": email, "name": "Ada", "tenant_id": tenant, "updated_at": "2024-02-29T08:11:12Z"}


def test_daemon_applies_kafka_changes_and_commits_after_redis(
        make_topic: Callable[..., str], producer: KafkaProducer, kafka_server: KafkaServer,
        redis_server: RedisServer, kafka_client: str) -> None:
    prefix = unique("kp") + ":"
    topic = make_topic(name=f"{unique('dbserver')}.public.users")
    dlq = unique("dlq.")
    key = json.dumps({"id": 1}).encode()
    producer.send(topic, key=key, value=user_event("c", 100, None, user(1, "ada@example.com")))
    producer.send(topic, key=key, value=b"{broken")
    producer.send(topic, key=key, value=user_event("u", 200, user(1, "ada@example.com"),
                                                   user(1, "ada@lovelace.dev", 8)))
    producer.flush()

    data = config_dict("postgresql://unused/none", redis_server.url, "unused", prefix)
    config = make_config(data)
    settings = KafkaSourceSettings.model_validate({
        "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"), "topics": [topic],
        "dead_letter_topic": dlq, "client": kafka_client, **FAST_GROUP})
    runner = DaemonThread(config, KafkaSource(settings))
    daemon = runner.daemon
    daemon.dead_letters = KafkaDeadLetters.from_settings(settings)
    runner.start(wait=False)
    r = redis.Redis.from_url(redis_server.url)
    try:
        new = wait_until(lambda: entry(r, f"{prefix}user:email:ada@lovelace.dev").get("d"), 30, what="update")
        assert json.loads(new)["tenant_id"] == 8
        old = entry(r, f"{prefix}user:email:ada@example.com")
        assert "d" not in old and int(old["v"]) == version(200)  # the old e-mail key: a tombstone at the update's LSN
        assert int(entry(r, f"{prefix}user:1")["v"]) == version(200)
        # offsets move once Redis has it all, the broken record included (it was dead-lettered first)
        wait_until(lambda: committed(kafka_server, settings.group_id, topic) == 3, 15, what="commit")
        (letter,) = read_all(kafka_server, dlq, 1)
        assert dict(letter.headers)["cdcd.offset"] == b"1"  # type: ignore[attr-defined]

        # a delete arriving later, and a stale replay of the insert: versions keep Redis moving forward
        producer.send(topic, key=key, value=user_event("d", 300, user(1, "ada@lovelace.dev", 8), None))
        producer.send(topic, key=key, value=user_event("c", 100, None, user(1, "ada@example.com")))
        producer.flush()
        wait_until(lambda: committed(kafka_server, settings.group_id, topic) == 5, 15, what="second commit")
        for k in ("user:1", "user:email:ada@lovelace.dev"):
            e = entry(r, f"{prefix}{k}")
            assert "d" not in e and int(e["v"]) == version(300), (k, e)
        assert "d" not in entry(r, f"{prefix}user:email:ada@example.com")  # the replayed insert was refused
        status = daemon.status()
        assert status["source"] == f"kafka:{settings.group_id}"
        assert status["position"]["partitions"][f"{topic}/0"]["committed"] == 5
    finally:
        runner.stop()
        daemon.dead_letters.close()
    assert runner.error is None, runner.error


def test_kafka_source_announces_no_watermark_and_positioned_reads_never_serve_old_values(
        make_topic: Callable[..., str], producer: KafkaProducer, kafka_server: KafkaServer,
        redis_server: RedisServer) -> None:
    """Read-your-writes is a Postgres-source feature (docs/read-your-writes.md): with Debezium topics there
    is no single position covering every partition, so the daemon announces none, and a read with a
    position bypasses the cache (or raises) instead of serving what may be older than the commit."""
    import pytest

    from cdcd.client import Cache, CacheOptions, NotApplied
    from tests.helpers import Backplane

    prefix = unique("kw") + ":"
    topic = make_topic(name=f"{unique('dbserver')}.public.users")
    settings = KafkaSourceSettings.model_validate({
        "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"), "topics": [topic], **FAST_GROUP})
    runner = DaemonThread(make_config(config_dict("postgresql://unused/none", redis_server.url, "unused", prefix)),
                          KafkaSource(settings))
    r = redis.Redis.from_url(redis_server.url)
    bp = Backplane(r, f"{prefix}#cdcd:bp")
    runner.start(wait=False)
    cache = Cache(redis_server.url, CacheOptions(prefix=prefix, ryw_timeout=0.3))
    try:
        producer.send(topic, key=json.dumps({"id": 1}).encode(), value=user_event("c", 100, None, user(1, "a@x")))
        producer.flush()
        wait_until(lambda: entry(r, f"{prefix}user:1").get("d"), 30, what="the change applied")
        wait_until(lambda: bp.received, 5, what="its backplane message")
        assert all("w" not in m for m in bp.received)
        assert r.hget(f"{prefix}#cdcd:applied", "watermark") in (None, b"0")
        calls = []
        value = cache.get_or_load("user:1", lambda: calls.append(1) or {"from": "database"}, min_position="0/1")
        assert value == {"from": "database"} and calls == [1], "bypassed: the loader's value, not the cache's"
        assert cache.stats.ryw_timeouts == 1
        assert '"a@x"' in entry(r, f"{prefix}user:1")["d"], "and not cached"
        strict = Cache(redis_server.url, CacheOptions(prefix=prefix, ryw_timeout=0.2, ryw_on_timeout="raise"))
        try:
            with pytest.raises(NotApplied):
                strict.get("user:1", min_position="0/1")
        finally:
            strict.close()
    finally:
        cache.close()
        bp.close()
        runner.stop()
