"""Dead letters on Kafka: a malformed record is produced to the DLQ topic with its reason and coordinates."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer

from cdcd.change import Rejected, Transaction
from cdcd.devservers import KafkaServer, free_port
from cdcd.sinks.kafka_dlq import KafkaDeadLetters, dead_letter
from cdcd.sources.base import SourceUnavailable
from cdcd.sources.kafka import KafkaPosition, KafkaSource
from tests.helpers import unique
from tests.kafka.test_kafka_source import change, committed, drain


def read_all(kafka_server: KafkaServer, topic: str, n: int, timeout: float = 20) -> list[object]:
    c = KafkaConsumer(topic, bootstrap_servers=kafka_server.bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None)
    out: list[object] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            for records in c.poll(200).values():
                out.extend(records)
    finally:
        c.close()
    return out


def test_malformed_record_is_dead_lettered_and_the_stream_goes_on(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer) -> None:
    topic = make_topic()
    dlq = unique("dlq.")
    producer.send(topic, key=b'{"id":1}', value=change(1))
    producer.send(topic, key=b'{"id":2}', value=b'{"op": "c", "after": {"id": 2}')  # truncated JSON
    producer.send(topic, key=b'{"id":3}', value=change(3))
    producer.flush()
    group = unique("g")
    source = make_source(topics=[topic], group_id=group, dead_letter_topic=dlq)
    items = drain(source, 3)
    assert [type(i) for i in items] == [Transaction, Rejected, Transaction]  # the next record still comes
    rejected = items[1]
    assert isinstance(rejected, Rejected)
    assert rejected.position == KafkaPosition(topic, 0, 1) and "not JSON" in rejected.reason

    # what the daemon does with it: dead-letter (durably), then acknowledge with the batch
    letters = KafkaDeadLetters.from_settings(source.settings)
    try:
        letters.send(rejected)
    finally:
        letters.close()
    source.ack([i.position for i in items])
    assert committed(kafka_server, group, topic) == 3

    (rec,) = read_all(kafka_server, dlq, 1)
    headers = {k: v.decode() for k, v in rec.headers}  # type: ignore[attr-defined]
    assert headers["cdcd.topic"] == topic
    assert (headers["cdcd.partition"], headers["cdcd.offset"]) == ("0", "1")
    assert "not JSON" in headers["cdcd.error"]
    assert headers["cdcd.origin"] == f"kafka:{topic}/0"
    body = json.loads(rec.value)  # type: ignore[attr-defined]
    assert (body["topic"], body["partition"], body["offset"]) == (topic, 0, 1)
    assert body["raw"] == '{"op": "c", "after": {"id": 2}' and body["raw_encoding"] == "utf-8"
    assert "not JSON" in body["reason"]
    assert rec.key == f"{topic}/0/1".encode()  # type: ignore[attr-defined]


def test_dead_letter_body_for_binary_raw_and_foreign_positions() -> None:
    key, headers, body = dead_letter(Rejected("bad", position=1234, raw=b"\xff\x00", origin="pg:slot"))
    doc = json.loads(body)
    assert (doc["raw"], doc["raw_encoding"], doc["position"], doc["topic"]) == ("/wA=", "base64", "1234", None)
    assert key == b"1234" and ("cdcd.position", b"1234") in headers


def test_dead_letters_without_a_broker_raise_source_unavailable() -> None:
    letters = KafkaDeadLetters("cdcd.dlq", bootstrap_servers=[f"127.0.0.1:{free_port()}"], create_topic=False)
    started = time.monotonic()
    try:
        letters.send(Rejected("bad", position=("t", 0, 1), raw=b"x"))
    except SourceUnavailable:
        pass
    else:
        raise AssertionError("send without a broker must not pass")
    assert time.monotonic() - started < 15
