"""The consumer group through kafka-python (``source.client: kafka-python``, the default).

kafka-python runs an IO thread of its own: the rebalance callbacks run there while ``poll()`` (or
``close()``) blocks on it, so they are coroutines, and a blocking consumer call from them would
deadlock (see :class:`_Listener`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import structlog

from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.kafka_group import Fetched, Rebalance, offsets_text
from cdcd.sources.settings import KafkaSourceSettings

log = structlog.get_logger("cdcd.source.kafka")


class KafkaPythonGroupConsumer:
    """:class:`~cdcd.sources.kafka_group.GroupConsumer` over ``kafka.KafkaConsumer``."""

    def __init__(self, settings: KafkaSourceSettings, rebalance: Rebalance, factory: Any = None) -> None:
        import kafka.errors as kerr
        from kafka import AsyncConsumerRebalanceListener, KafkaConsumer

        s = settings
        self.settings = s
        kwargs = {
            **s.client_kwargs(),
            "group_id": s.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": s.auto_offset_reset,
            "session_timeout_ms": s.session_timeout_ms,
            "heartbeat_interval_ms": s.heartbeat_interval_ms,
            "max_poll_interval_ms": s.max_poll_interval_ms,
            "max_poll_records": s.max_poll_records,
            **s.fetch_kwargs(),
            "bootstrap_timeout_ms": int(s.connect_timeout * 1000),
            "metadata_max_age_ms": s.metadata_max_age_ms,  # a topic_pattern picks up new tables' topics
        }
        try:
            consumer = (factory or KafkaConsumer)(**kwargs)
        except (kerr.KafkaConfigurationError, ValueError, TypeError) as exc:
            raise SourceError(f"kafka consumer configuration: {exc}") from exc
        except (kerr.KafkaError, OSError) as exc:
            raise SourceUnavailable(f"cannot bootstrap from {','.join(s.bootstrap_servers)}: {exc}") from exc
        AsyncConsumerRebalanceListener.register(_Listener)  # an ABC: what subscribe() checks for
        listener = _Listener(rebalance, consumer)
        if s.topic_pattern:
            consumer.subscribe(pattern=s.topic_pattern, listener=listener)
        else:
            consumer.subscribe(topics=list(s.topics or ()), listener=listener)
        self.consumer = consumer

    def poll(self, timeout: float) -> Fetched:
        import kafka.errors as kerr

        try:
            batches = self.consumer.poll(timeout_ms=max(0, int(timeout * 1000)))
        except kerr.AuthorizationError as exc:
            raise SourceError(f"not authorized to consume: {exc}") from exc
        except kerr.KafkaError as exc:
            raise SourceUnavailable(f"kafka poll failed: {exc}") from exc
        return {tp: [(r.offset, r.key, r.value) for r in records] for tp, records in batches.items()}

    def commit(self, offsets: Mapping[Any, int]) -> bool:
        import kafka.errors as kerr
        from kafka import OffsetAndMetadata

        group_moved_on = (kerr.CommitFailedError, kerr.IllegalStateError, kerr.IllegalGenerationError,
                          kerr.UnknownMemberIdError, kerr.RebalanceInProgressError, kerr.FencedInstanceIdError)
        try:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                                 timeout_ms=self.settings.request_timeout_ms)
        except group_moved_on as exc:
            log.info("kafka_commit_refused_by_group", error=str(exc))  # the source logs which offsets
            return False
        except kerr.AuthorizationError as exc:
            raise SourceError(f"not authorized to commit offsets for group {self.settings.group_id!r}: {exc}") \
                from exc
        except (kerr.KafkaError, OSError) as exc:
            raise SourceUnavailable(f"offset commit failed: {exc}") from exc
        return True

    def set_paused(self, paused: bool) -> None:
        parts = self.consumer.assignment()
        if paused:
            self.consumer.pause(*parts)
        else:
            self.consumer.resume(*parts)

    def highwater(self, part: Any) -> int | None:
        try:
            hw = self.consumer.highwater(part)
        except Exception:
            return None
        return hw if isinstance(hw, int) else None

    def connected(self) -> bool:
        """Is any broker connection up? kafka-python has no public call for this; degrade to True."""
        try:
            client = self.consumer._client
            brokers = client.cluster.brokers()
            if not brokers:
                return False
            return any(client.connected(b.node_id) for b in brokers)
        except AttributeError:
            return True

    def close(self) -> None:
        # leaving the group needs the broker; without one, waiting only delays the reconnect
        timeout_ms = 5000 if self.connected() else 500
        try:
            self.consumer.close(autocommit=False, timeout_ms=timeout_ms)
        except Exception as exc:  # closing must not fail the caller: the group times us out anyway
            log.warning("kafka_close_failed", error=str(exc))


class _Listener:
    """Rebalance callbacks (an ``AsyncConsumerRebalanceListener``, registered as one above).

    They run on kafka-python's IO thread while ``poll()`` (or ``close()``) blocks on it, so
    they are async: a blocking consumer call from there would deadlock.
    """

    def __init__(self, rebalance: Rebalance, consumer: Any) -> None:
        self.rebalance = rebalance
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if not revoked:
            return  # the first join also "revokes" the empty assignment
        offsets = self.rebalance.revoking(list(revoked))
        if offsets and await self._commit(offsets):
            self.rebalance.committed(offsets, "revoke")
        self.rebalance.forget(list(revoked), "revoked")

    async def on_partitions_lost(self, lost: Any) -> None:
        # evicted from the group: committing would be refused; the new owner re-reads
        if lost:
            self.rebalance.forget(list(lost), "lost")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.rebalance.assigned(list(assigned))

    async def _commit(self, offsets: dict[Any, int]) -> bool:
        """Commit while we still own the partitions, through the coordinator's own coroutine.

        ``consumer.commit()`` blocks on the IO thread we are running on, so it cannot be
        used here; kafka-python's coordinator awaits this same coroutine for its
        pre-rebalance auto-commit. If a future kafka-python renames it, nothing is lost:
        the offsets stay uncommitted and are re-delivered to the next owner.
        """
        from kafka import OffsetAndMetadata

        commit = getattr(getattr(self.consumer, "_coordinator", None), "_commit_offsets_sync_async", None)
        if commit is None or not inspect.iscoroutinefunction(commit):
            log.warning("kafka_revoke_commit_unsupported", offsets=offsets_text(offsets))
            return False
        try:
            await commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}, timeout_ms=5000)
        except Exception as exc:
            log.warning("kafka_revoke_commit_failed", error=str(exc), offsets=offsets_text(offsets))
            return False
        return True

