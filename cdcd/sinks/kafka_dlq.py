"""Dead letters for the Kafka source: rejected records go to a Kafka topic next to their origin.

Why a topic rather than the Redis stream: operators of a Debezium pipeline
already watch and replay Kafka topics, and a record that cdcd could not parse is
a Kafka record. The dead letter carries the reason and the original coordinates
as headers (``cdcd.error``, ``cdcd.topic``, ``cdcd.partition``, ``cdcd.offset``,
``cdcd.origin``) so tools can route on them without parsing, and a JSON body
with the same facts plus the original value (text when it is UTF-8, else
base64).

:meth:`KafkaDeadLetters.send` returns only once the broker acknowledged the
dead letter (``acks=all`` and a flush): the daemon acknowledges the original
record right after, and its offset must not be committed before its dead letter
is durable. A broker that does not take it raises
:class:`~cdcd.sources.base.SourceUnavailable`, which makes the daemon back off,
reconnect and re-read the record (so it is dead-lettered again, not lost).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import kafka.errors as kerr
import structlog
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from cdcd.change import Rejected
from cdcd.sources.base import SourceUnavailable
from cdcd.sources.kafka import probe_bootstrap

log = structlog.get_logger("cdcd.sinks.kafka_dlq")

RAW_MAX = 1_000_000  # bytes of the original value kept in the body (Kafka's default message size is ~1 MB)


def dead_letter(rejected: Rejected) -> tuple[bytes, list[tuple[str, bytes]], bytes]:
    """(key, headers, body) of the dead letter for ``rejected``; pure, for tests and other producers."""
    topic, partition, offset = _coordinates(rejected.position)
    raw = rejected.raw
    body: dict[str, Any] = {
        "reason": rejected.reason, "origin": rejected.origin,
        "topic": topic, "partition": partition, "offset": offset,
        "position": None if topic is not None else str(rejected.position),
        "ts": time.time(),
    }
    if rejected.key is not None:
        body["key"] = rejected.key
    if raw is None:
        body["raw"] = None
    else:
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        body["raw_truncated"] = len(data) > RAW_MAX
        data = data[:RAW_MAX]
        try:
            body["raw"], body["raw_encoding"] = data.decode(), "utf-8"
        except UnicodeDecodeError:
            body["raw"], body["raw_encoding"] = base64.b64encode(data).decode(), "base64"
    headers = [("cdcd.error", rejected.reason.encode()), ("cdcd.origin", rejected.origin.encode())]
    if rejected.key is not None:
        headers.append(("cdcd.key", rejected.key.encode()))
    if topic is not None:
        headers += [("cdcd.topic", topic.encode()), ("cdcd.partition", str(partition).encode()),
                    ("cdcd.offset", str(offset).encode())]
    else:
        headers.append(("cdcd.position", str(rejected.position).encode()))
    key = f"{topic}/{partition}/{offset}" if topic is not None else str(rejected.position)
    return key.encode(), headers, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _coordinates(position: Any) -> tuple[str | None, int | None, int | None]:
    try:
        topic, partition, offset = position
    except (TypeError, ValueError):
        return None, None, None
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return topic, partition, offset
    return None, None, None


class KafkaDeadLetters:
    """``send(rejected)`` produces one dead letter and waits until the broker has it."""

    def __init__(self, topic: str = "cdcd.dlq", timeout: float = 10.0, create_topic: bool = True,
                 **client: Any) -> None:
        self.topic = topic
        self.timeout = timeout
        self.create_topic = create_topic
        self.client = client  # bootstrap_servers, client_id, security options
        self._producer: Any = None
        self.sent = 0

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> KafkaDeadLetters:
        """From a :class:`~cdcd.sources.kafka.KafkaSourceSettings` (same cluster and credentials)."""
        client = settings.client_kwargs()
        client["client_id"] = f"{settings.client_id}-dlq"
        return cls(settings.dead_letter_topic, **kw, **client)

    def _connect(self) -> Any:
        if self._producer is not None:
            return self._producer
        servers = self.client.get("bootstrap_servers", [])
        probe_bootstrap([servers] if isinstance(servers, str) else servers, min(self.timeout, 5.0))
        if self.create_topic:
            self._ensure_topic()
        try:
            self._producer = KafkaProducer(acks="all", retries=5, linger_ms=0, bootstrap_timeout_ms=5000,
                                           **self.client)
        except (kerr.KafkaError, OSError) as exc:
            raise SourceUnavailable(f"dead-letter producer cannot connect: {exc}") from exc
        return self._producer

    def _ensure_topic(self) -> None:
        """Create the topic if missing; clusters with auto.create.topics.enable=false need this.

        Failure is not fatal: the topic may exist already, be created by the broker on first
        produce, or be managed by the operator (then the produce itself reports the problem).
        """
        admin = None
        try:
            admin = KafkaAdminClient(bootstrap_timeout_ms=5000, **self.client)
            admin.create_topics([NewTopic(self.topic, 1, -1)])
            log.info("dead_letter_topic_created", topic=self.topic)
        except kerr.TopicAlreadyExistsError:
            pass
        except Exception as exc:
            log.debug("dead_letter_topic_not_created", topic=self.topic, error=str(exc))
        finally:
            if admin is not None:
                admin.close()
        self.create_topic = False

    def send(self, rejected: Rejected) -> None:
        key, headers, body = dead_letter(rejected)
        producer = self._connect()
        try:
            future = producer.send(self.topic, key=key, value=body, headers=headers)
            producer.flush(timeout=self.timeout)
            meta = future.get(timeout=self.timeout)
        except (kerr.KafkaError, OSError) as exc:
            self.close()
            raise SourceUnavailable(f"dead letter not accepted by {self.topic}: {exc}") from exc
        self.sent += 1
        log.warning("dead_lettered", topic=self.topic, partition=meta.partition, offset=meta.offset,
                    reason=rejected.reason, origin=rejected.origin, position=str(rejected.position))

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception as exc:
                log.debug("dead_letter_producer_close_failed", error=str(exc))
