"""The Kafka consumer group as the source sees it, whichever client library speaks the protocol.

:class:`~cdcd.sources.kafka.KafkaSource` holds everything that is cdcd's own (which offsets are done,
what may be committed, how records are parsed, when the broker counts as lost) and talks to the group
through :class:`GroupConsumer` only. Two clients implement it:

* ``kafka-python`` (:mod:`cdcd.sources.kafka_python_consumer`), the default: pure Python, what the
  project was built on;
* ``confluent`` (:mod:`cdcd.sources.kafka_confluent_consumer`), librdkafka through confluent-kafka:
  the same records for a fifth of the CPU, which is what a daemon needs past ~20 000 changes/s
  (BENCHMARKS.md; docs/kafka.md#choosing-the-client).

Partitions are keys of the form ``(topic, partition)``: kafka-python's ``TopicPartition`` is such a
named tuple already, :class:`Part` is the one the confluent client builds, and both equal the plain
tuple, which is what ``ack`` looks positions up with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol


class Part(NamedTuple):
    """A topic partition: equal to kafka-python's ``TopicPartition`` and to the plain tuple."""

    topic: str
    partition: int


Fetched = Mapping[Any, Sequence[tuple[int, bytes | None, bytes | None]]]
"""Per partition, in offset order: (offset, key, value) of each record a poll returned."""


def offsets_text(offsets: Mapping[Any, int]) -> dict[str, int]:
    """``{"topic/partition": offset}``: offsets as the logs show them."""
    return {f"{tp[0]}/{tp[1]}": off for tp, off in offsets.items()}


class Rebalance(Protocol):
    """What the source does when the group moves partitions; the client calls it during ``poll``/``close``."""

    def assigned(self, parts: Sequence[Any]) -> None: ...

    def revoking(self, parts: Sequence[Any]) -> dict[Any, int]:
        """Offsets to commit while this consumer still owns ``parts`` (the client commits them)."""
        ...

    def committed(self, offsets: dict[Any, int], why: str) -> None: ...

    def forget(self, parts: Sequence[Any], why: str) -> None:
        """``parts`` are gone (``revoked`` after the commit, or ``lost``): drop what was not acknowledged."""
        ...


class GroupConsumer(Protocol):
    """One member of the consumer group, subscribed; used from the daemon's poll thread only."""

    def poll(self, timeout: float) -> Fetched:
        """Records of at most ``max_poll_records``; {} after ``timeout`` seconds.

        Raises SourceError (not authorized) or SourceUnavailable (the client gave up)."""
        ...

    def commit(self, offsets: Mapping[Any, int]) -> bool:
        """Commit ``offsets`` (next offset to read, per partition) synchronously.

        False: refused because the group moved on (a rebalance; the next owner re-reads). Raises
        SourceError (not authorized) or SourceUnavailable."""
        ...

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) fetching every assigned partition while still polling (group membership)."""
        ...

    def highwater(self, part: Any) -> int | None:
        """The partition's high watermark as of the last fetch, if the client knows it."""
        ...

    def connected(self) -> bool:
        """Is some broker reachable? (Used only when polls come back empty.)"""
        ...

    def close(self) -> None:
        """Leave the group without committing anything the source did not commit itself."""
        ...

