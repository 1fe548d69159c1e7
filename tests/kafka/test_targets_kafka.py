"""Several Redis targets behind a Kafka source (docs/multi-target.md): offsets commit only what every target
applied; a target that is down does not stop the other, and catches up once back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis
from kafka import KafkaProducer

from cdcd.devservers import KafkaServer, RedisServer
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from tests.helpers import DaemonThread, config_dict, entry, make_config, unique, wait_until
from tests.kafka.conftest import FAST_GROUP
from tests.kafka.test_daemon_kafka import user, user_event, version
from tests.kafka.test_kafka_source import committed


def test_offsets_wait_for_the_slowest_target(make_topic: Callable[..., str], producer: KafkaProducer,
                                             kafka_server: KafkaServer) -> None:
    a, b = RedisServer(), RedisServer()
    a.start()
    b.start()
    ra, rb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
    prefix = unique("kp") + ":"
    topic = make_topic(name=f"{unique('dbserver')}.public.users")

    def send(op: str, lsn: int, id_: int, email: str) -> None:
        producer.send(topic, key=json.dumps({"id": id_}).encode(),
                      value=user_event(op, lsn, None if op == "c" else user(id_, email), user(id_, email)))
        producer.flush()

    data = config_dict("postgresql://unused/none", a.url, "unused", prefix)
    del data["redis"]
    conn = {"socket_timeout": 1.0, "connect_timeout": 0.5}
    data["targets"] = {"a": {"url": a.url, **conn}, "b": {"url": b.url, **conn}}
    settings = KafkaSourceSettings.model_validate({
        "bootstrap_servers": [kafka_server.bootstrap], "group_id": unique("g"), "topics": [topic], **FAST_GROUP})
    runner = DaemonThread(make_config(data), KafkaSource(settings)).start(wait=False)
    try:
        send("c", 100, 1, "one@x")
        for r in (ra, rb):
            wait_until(lambda r=r: entry(r, f"{prefix}user:1").get("d"), 30, what="the first record on both targets")
        wait_until(lambda: committed(kafka_server, settings.group_id, topic) == 1, 15, what="first commit")
        b.stop()
        send("u", 200, 1, "one@y")
        send("c", 300, 2, "two@x")
        wait_until(lambda: entry(ra, f"{prefix}user:2").get("d"), 15, what="a applied while b is down")
        time.sleep(0.5)  # commits are immediate once acked: give a wrong one the chance to show
        assert committed(kafka_server, settings.group_id, topic) == 1  # held back by b
        b.start()  # back, empty
        wait_until(lambda: entry(rb, f"{prefix}user:2").get("d"), 15, what="b caught up")
        assert int(entry(rb, f"{prefix}user:1")["v"]) == version(200)
        wait_until(lambda: committed(kafka_server, settings.group_id, topic) == 3, 15, what="commit once b applied")
    finally:
        runner.stop()
        a.stop()
        b.stop()
    assert runner.error is None, runner.error
