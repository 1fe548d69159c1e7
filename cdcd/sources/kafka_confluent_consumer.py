"""The consumer group through confluent-kafka (librdkafka): ``source.client: confluent``.

Why a second client: kafka-python unpacks every record in Python, 16-22 µs of CPU per 3.5 KB Debezium
record before cdcd sees it; librdkafka does the same in C threads for 3.5-5.6 µs (BENCHMARKS.md
section 26). The daemon then drains ~37 000 changes/s instead of ~21 000 on this machine.

librdkafka runs the rebalance callbacks on the thread that calls ``consume``/``close`` (the poll
thread), synchronously, so a revoke can commit with a plain synchronous commit while this member still
owns the partitions. Connection state comes from the error callback (``_ALL_BROKERS_DOWN``), which
librdkafka also serves from ``consume``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.kafka_group import Fetched, Part, Rebalance
from cdcd.sources.settings import KafkaSourceSettings

log = structlog.get_logger("cdcd.source.kafka")

# the group moved on: the next owner re-reads from the last commit, nothing to raise about
_GROUP_MOVED_ON = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_INSTANCE_ID, KafkaError._ASSIGNMENT_LOST, KafkaError._STATE,
})
_NOT_AUTHORIZED = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError._AUTHENTICATION,
})
# per-message errors that are information, not failures
_BENIGN = frozenset({KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART})


class _DebugLog(logging.Logger):
    """librdkafka's own log lines (a connection refused while a broker restarts is logged as an error
    there) as debug events: what matters reaches the source through the error callback and per-message
    errors, which it reports itself (``kafka_fetch_error``, SourceUnavailable)."""

    def handle(self, record: logging.LogRecord) -> None:
        log.debug("librdkafka", message=record.getMessage())


_LIBRDKAFKA_LOG = _DebugLog("cdcd.source.kafka.librdkafka")


_SECURITY_NAMES = {
    "sasl_mechanism": "sasl.mechanisms", "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location", "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
}


def consumer_config(s: KafkaSourceSettings) -> dict[str, Any]:
    """The settings under librdkafka's names (the same meaning as kafka-python's)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.bootstrap_servers),
        "client.id": s.client_id,
        "group.id": s.group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": s.auto_offset_reset,
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": s.heartbeat_interval_ms,
        "max.poll.interval.ms": s.max_poll_interval_ms,
        "fetch.wait.max.ms": s.fetch_max_wait_ms,
        "fetch.min.bytes": s.fetch_min_bytes,
        "max.partition.fetch.bytes": s.max_partition_fetch_bytes,
        "fetch.max.bytes": s.fetch_max_bytes,
        "receive.message.max.bytes": max(100_000_000, s.fetch_max_bytes + 512),
        # when its prefetch queue is full librdkafka stops fetching for this long (default 1 s): the
        # daemon then drained the queue and waited ~0.5 s for the next fetch, every few batches
        "fetch.queue.backoff.ms": 10,
        "socket.timeout.ms": s.request_timeout_ms,
        "topic.metadata.refresh.interval.ms": s.metadata_max_age_ms,
        "reconnect.backoff.max.ms": 1000,
        "security.protocol": s.security_protocol,
    }
    # security options: the ones the dead-letter producer gets too (client_kwargs), under librdkafka's names
    for ours, value in s.client_kwargs().items():
        if ours == "ssl_check_hostname":
            conf["ssl.endpoint.identification.algorithm"] = "https" if value else "none"
        elif ours in _SECURITY_NAMES:
            conf[_SECURITY_NAMES[ours]] = value
    return conf


def subscription(s: KafkaSourceSettings) -> list[str]:
    """Topic names, or the pattern as librdkafka wants it: a leading ``^`` marks a regex.

    kafka-python matches ``topic_pattern`` from the start of the name (``re.match``); ``^(...)`` keeps
    that meaning for librdkafka's (POSIX-style) regex search."""
    if s.topic_pattern:
        p = s.topic_pattern
        return [p if p.startswith("^") else f"^({p})"]
    return list(s.topics or ())


class ConfluentGroupConsumer:
    """:class:`~cdcd.sources.kafka_group.GroupConsumer` over ``confluent_kafka.Consumer``."""

    def __init__(self, settings: KafkaSourceSettings, rebalance: Rebalance) -> None:
        self.settings = settings
        self.rebalance = rebalance
        self._down = False
        self._fatal: str | None = None
        conf = consumer_config(settings)
        conf["error_cb"] = self._on_error
        conf["logger"] = _LIBRDKAFKA_LOG
        try:
            self.consumer = Consumer(conf)
        except (KafkaException, ValueError, TypeError) as exc:
            raise SourceError(f"kafka consumer configuration: {exc}") from exc
        try:
            self.consumer.subscribe(subscription(settings), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
        except KafkaException as exc:
            self.consumer.close()
            raise SourceError(f"kafka subscription: {exc}") from exc

    # ------------------------------------------------------------------ callbacks (on the poll thread)

    def _on_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._ALL_BROKERS_DOWN:
            self._down = True
        if err.fatal():
            self._fatal = str(err)
        log.debug("kafka_client_error", error=str(err))

    def _on_assign(self, consumer: Any, parts: list[TopicPartition]) -> None:
        self.rebalance.assigned(_parts(parts))

    def _on_revoke(self, consumer: Any, parts: list[TopicPartition]) -> None:
        ours = _parts(parts)
        if not ours:
            return
        offsets = self.rebalance.revoking(ours)
        if offsets:
            try:
                if self.commit(offsets):
                    self.rebalance.committed(offsets, "revoke")
            except (SourceError, SourceUnavailable) as exc:  # the next owner re-reads: nothing lost
                log.warning("kafka_revoke_commit_failed", error=str(exc))
        self.rebalance.forget(ours, "revoked")

    def _on_lost(self, consumer: Any, parts: list[TopicPartition]) -> None:
        if parts:
            self.rebalance.forget(_parts(parts), "lost")

    # ------------------------------------------------------------------ GroupConsumer

    def poll(self, timeout: float) -> Fetched:
        try:
            messages = self.consumer.consume(self.settings.max_poll_records, max(0.0, timeout))
        except (KafkaException, RuntimeError) as exc:
            raise SourceUnavailable(f"kafka poll failed: {exc}") from exc
        if self._fatal is not None:
            raise SourceUnavailable(f"kafka client failed: {self._fatal}")
        out: dict[Part, list[tuple[int, bytes | None, bytes | None]]] = {}
        current: Part | None = None
        records: list[tuple[int, bytes | None, bytes | None]] = []
        for m in messages:
            err = m.error()
            if err is not None:
                self._message_error(err)
                continue
            # a message without an error always has its topic, partition and offset (None only on errors)
            topic, partition = m.topic(), m.partition()
            if current is None or current.topic != topic or current.partition != partition:
                current = Part(topic, partition)  # type: ignore[arg-type]
                records = out.setdefault(current, [])
            records.append((m.offset(), m.key(), m.value()))  # type: ignore[arg-type]
        if out:
            self._down = False
        return out

    def _message_error(self, err: KafkaError) -> None:
        code = err.code()
        if code in _BENIGN:
            log.debug("kafka_client_notice", error=str(err))
        elif code in _NOT_AUTHORIZED:
            raise SourceError(f"not authorized to consume: {err}")
        elif err.fatal():
            raise SourceUnavailable(f"kafka client failed: {err}")
        else:
            log.warning("kafka_fetch_error", error=str(err))

    def commit(self, offsets: Mapping[Any, int]) -> bool:
        tps = [TopicPartition(tp[0], tp[1], off) for tp, off in offsets.items()]
        try:
            result = self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            return self._commit_error(err, str(exc))
        for tp in result or ():
            if tp.error is not None:
                return self._commit_error(tp.error, str(tp.error))
        return True

    def _commit_error(self, err: KafkaError | None, text: str) -> bool:
        code = err.code() if err is not None else None
        if code in _GROUP_MOVED_ON:
            log.info("kafka_commit_refused_by_group", error=text)
            return False
        if code in _NOT_AUTHORIZED:
            raise SourceError(f"not authorized to commit offsets for group {self.settings.group_id!r}: {text}")
        raise SourceUnavailable(f"offset commit failed: {text}")

    def set_paused(self, paused: bool) -> None:
        parts = self.consumer.assignment()
        try:
            if paused:
                self.consumer.pause(parts)
            else:
                self.consumer.resume(parts)
        except KafkaException as exc:
            raise SourceUnavailable(f"kafka {'pause' if paused else 'resume'} failed: {exc}") from exc

    def highwater(self, part: Any) -> int | None:
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(part[0], part[1]), cached=True)
        except (KafkaException, RuntimeError):
            return None
        return high if isinstance(high, int) and high >= 0 else None

    def connected(self) -> bool:
        if not self._down:
            return True
        try:  # a metadata round trip: librdkafka reconnects by itself, this tells whether it has
            self.consumer.list_topics(timeout=0.5)
        except (KafkaException, RuntimeError):
            return False
        self._down = False
        return True

    def close(self) -> None:
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:  # the group times us out anyway
            log.warning("kafka_close_failed", error=str(exc))


def _parts(tps: Sequence[TopicPartition]) -> list[Part]:
    return [Part(tp.topic, tp.partition) for tp in tps]
