"""Fixtures for the Kafka/Debezium source: a tansu broker, topics, producers and fast-joining consumers.

Postgres (``pg_server``) and Redis (``redis_server``) come from the suite's
conftest. Every test uses fresh topic and group names: a group keeps the
session timeout it was first formed with, and tansu holds a JoinGroup for
about half of it, so short timeouts (and new groups) keep joins at ~1-3 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from cdcd.devservers import KafkaServer
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from tests.helpers import unique

FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[KafkaServer]:
    server = KafkaServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def admin(kafka_server: KafkaServer) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_server.bootstrap)
    yield client
    client.close()


@pytest.fixture
def make_topic(admin: KafkaAdminClient) -> Callable[..., str]:
    def make(partitions: int = 1, name: str | None = None) -> str:
        topic = name or unique("topic.")
        admin.create_topics([NewTopic(topic, partitions, 1)])
        return topic

    return make


@pytest.fixture
def producer(kafka_server: KafkaServer) -> Iterator[KafkaProducer]:
    p = KafkaProducer(bootstrap_servers=kafka_server.bootstrap, acks="all", linger_ms=0)
    yield p
    p.close(5)


KAFKA_CLIENTS = ["kafka-python", "confluent"]


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each source test runs with both Kafka client libraries (``source.client``)."""
    return str(request.param)


@pytest.fixture
def make_source(kafka_server: KafkaServer, kafka_client: str) -> Iterator[Callable[..., KafkaSource]]:
    """KafkaSource factory (fast group settings, fresh group unless given); closes what it made."""
    made: list[KafkaSource] = []

    def make(**overrides: Any) -> KafkaSource:
        data: dict[str, Any] = {"bootstrap_servers": kafka_server.bootstrap, "group_id": unique("g"),
                                "unavailable_after": 3.0, "client": kafka_client, **FAST_GROUP, **overrides}
        source = KafkaSource(KafkaSourceSettings.model_validate(data))
        source.connect()
        made.append(source)
        return source

    yield make
    for s in made:
        with contextlib.suppress(Exception):
            s.close()
