"""The contract of a dead-letter destination.

A record the daemon cannot apply (malformed, or a write Redis refused for good) is sent here
before its position is acknowledged, so a crash re-delivers it rather than loses it. Two
implementations: :class:`cdcd.sinks.redis.RedisDeadLetters` (a capped stream) and
:class:`cdcd.sinks.kafka_dlq.KafkaDeadLetters` (a topic next to the source's).
"""

from __future__ import annotations

from typing import Protocol

from cdcd.change import Rejected


class DeadLetters(Protocol):
    def send(self, rejected: Rejected) -> None:
        """Return only once the record is durable. Raises what the daemon retries: RedisError for
        Redis, SourceUnavailable for Kafka (the daemon reconnects and the record is re-read)."""

    def close(self) -> None:
        """Release what the destination opened (the daemon calls it once, at exit)."""
