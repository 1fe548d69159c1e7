"""Kafka source: Debezium topics consumed in a consumer group (kafka-python or confluent-kafka).

Checkpointing is the whole point of this module. Offsets are committed only by
:meth:`KafkaSource.ack`, which the daemon calls after Redis acknowledged the
items, and per partition only up to the first offset that was delivered but not
yet acknowledged: ``ack`` of offsets 5 and 7 after delivering 5, 6, 7 commits 6
(= 5 + 1), never 8. Records that carry no change (delete tombstones, other
applications' messages) count as acknowledged the moment they are read, so they
never hold the offset back and are never re-read for nothing.

Rebalances: when partitions are revoked, whatever is acknowledged for them is
committed while this consumer still owns them, and what was delivered but not
acknowledged is forgotten: the next owner (maybe this consumer again) starts at
the committed offset and reads it again. A late ``ack`` for a partition this
consumer no longer tracks is ignored. Nothing is lost, nothing is skipped, and
re-delivery is harmless because Redis writes are versioned.

Broker loss: both clients reconnect on their own and ``poll`` just returns
nothing, which would look like an idle stream. After ``unavailable_after``
seconds without a connection to any broker, :meth:`poll` raises
:class:`SourceUnavailable`, the daemon closes the source, backs off and
connects again; uncommitted records are then re-delivered.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from cdcd.change import Rejected, Transaction
from cdcd.pg.snapshots import ProbeError, SnapshotProbe
from cdcd.pg.visibility import Snapshot
from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.debezium import ParseOptions, parse_record
from cdcd.sources.kafka_group import GroupConsumer, Rebalance, offsets_text
from cdcd.sources.settings import KafkaSourceSettings as KafkaSourceSettings  # re-exported
from cdcd.sources.settings import TopicOptions as TopicOptions
from cdcd.sources.visibility_gate import VisibilityCounts, VisibilityGate, VisibilityWait

log = structlog.get_logger("cdcd.source.kafka")

# kafka-python is imported where it is used, so the settings model (and with it the daemon's
# configuration) loads without the kafka extra installed.

_crc_warned = False


def crc32c_is_native() -> bool:
    """Does kafka-python check record CRCs with the C ``crc32c`` package (the ``kafka`` extra)?

    kafka-python picks the package up by itself when it can import it, and silently falls
    back to a pure-Python CRC-32C otherwise, which made the daemon spend ~7x the CPU per change
    (BENCHMARKS.md, issue 9). What counts is the function ``calc_crc32c`` was bound to at
    import, so a package installed after kafka-python was imported still reads as pure.
    """
    try:
        from kafka.record import util
    except ImportError:
        return False
    pure = getattr(util, "crc32c_py", None)
    defaults = getattr(util.calc_crc32c, "__defaults__", None) or ()
    used = defaults[0] if defaults else getattr(util, "_crc32c", None)
    if pure is None or used is None:  # kafka-python's internals moved: whether the package imports
        import importlib.util

        return importlib.util.find_spec("crc32c") is not None
    return used is not pure


def warn_if_crc32c_pure_python() -> bool:
    """Log ``kafka_crc32c_pure_python`` once per process when the CRC is pure Python; True if native."""
    global _crc_warned
    native = crc32c_is_native()
    if not native and not _crc_warned:
        _crc_warned = True
        log.warning("kafka_crc32c_pure_python",
                    detail="kafka-python checks record CRCs in pure Python, which multiplied the daemon's CPU per "
                           "change by ~7 in cdcd's benchmark; install the C package: pip install 'crc32c>=2.3' "
                           "(part of cdcd[kafka])")
    return native


def open_group_consumer(settings: KafkaSourceSettings, rebalance: Rebalance, factory: Any = None) -> GroupConsumer:
    """The client ``settings.client`` names (docs/kafka.md#choosing-the-client), subscribed; it joins the
    group on its first poll. Each client module is imported only when chosen."""
    if settings.client == "confluent":
        try:
            from cdcd.sources.kafka_confluent_consumer import ConfluentGroupConsumer
        except ImportError as exc:
            raise SourceError("source.client is 'confluent' but confluent-kafka is not installed: "
                              f"pip install 'cdcd[kafka-fast]' ({exc})") from None
        return ConfluentGroupConsumer(settings, rebalance)
    from cdcd.sources.kafka_python_consumer import KafkaPythonGroupConsumer

    return KafkaPythonGroupConsumer(settings, rebalance, factory)


class KafkaPosition(NamedTuple):
    """Where a record came from; what ``ack`` gets back. A plain tuple: (topic, partition, offset)."""

    topic: str
    partition: int
    offset: int


def probe_bootstrap(servers: Sequence[str], timeout: float) -> None:
    """A TCP connect to some bootstrap server before building a kafka-python client.

    kafka-python starts its IO thread in a client's constructor and does not stop it when
    the bootstrap then fails: retrying a dead broker through the constructor would leak a
    thread per attempt (and each attempt would take the whole bootstrap timeout).
    """
    last: Exception | None = None
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
                return
        except (OSError, ValueError) as exc:
            last = exc
    raise SourceUnavailable(f"no Kafka broker reachable at {','.join(servers)}: {last}")


# ------------------------------------------------------------------------------ offset tracking


@dataclass
class _Partition:
    """Offsets of one assigned partition: delivered in order, acknowledged in any order."""

    delivered: deque[int] = field(default_factory=deque)  # delivered, not yet committable, ascending
    pending: set[int] = field(default_factory=set)  # the same offsets, for lookups
    acked: set[int] = field(default_factory=set)  # subset of pending
    high: int = -1  # highest offset delivered in this assignment
    committable: int | None = None  # next offset to read once everything before it is done
    committed: int | None = None  # what the group holds (as far as we committed it)

    def deliver(self, offset: int, done: bool) -> bool:
        """Track a fetched offset; False if it was delivered before in this assignment."""
        if offset <= self.high:
            return False
        self.high = offset
        self.delivered.append(offset)
        self.pending.add(offset)
        if done:
            self.acked.add(offset)
        return True

    def ack(self, offset: int) -> bool:
        if offset in self.pending:
            self.acked.add(offset)
            return True
        return False

    def advance(self) -> None:
        while self.delivered and self.delivered[0] in self.acked:
            offset = self.delivered.popleft()
            self.pending.discard(offset)
            self.acked.discard(offset)
            self.committable = offset + 1

    def dirty(self) -> bool:
        return self.committable is not None and self.committable != self.committed


class _Tracker:
    """Per-partition state shared by the poll thread and the rebalance callbacks (kafka-python's IO thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parts: dict[Any, _Partition] = {}

    def to_commit(self, tps: Any = None) -> dict[Any, int]:
        with self.lock:
            return {tp: p.committable for tp, p in self.parts.items()
                    if (tps is None or tp in tps) and p.dirty() and p.committable is not None}

    def committed(self, offsets: dict[Any, int]) -> None:
        with self.lock:
            for tp, off in offsets.items():
                p = self.parts.get(tp)
                if p is not None:
                    p.committed = off


# ------------------------------------------------------------------------------ the source


class KafkaSource:
    """The :class:`~cdcd.sources.base.Source` protocol over a Kafka consumer group of Debezium topics."""

    def __init__(self, settings: KafkaSourceSettings, consumer_factory: Any = None) -> None:
        self.settings = settings
        self.name = f"kafka:{settings.group_id}"
        self._factory = consumer_factory
        self._consumer: GroupConsumer | None = None
        self._tracker = _Tracker()
        self._options: dict[str, ParseOptions] = {}
        self._disconnected_since: float | None = None
        self._lag: dict[str, Any] = {}
        self.delivered = 0
        self.skipped = 0
        self.rejected = 0
        self.commits = 0
        self.rebalances = 0
        # optional: hold records until their Postgres transaction is visible (visibility_check_dsn)
        self._snapshots: SnapshotProbe | None = None
        self.gate: VisibilityGate | None = None
        self._paused = False
        dsn = settings.visibility_check_dsn
        if dsn is not None:
            self._snapshots = SnapshotProbe(dsn.get_secret_value())
            self.gate = VisibilityGate(self._fetch_snapshot, time.monotonic)

    @classmethod
    def from_settings(cls, settings: KafkaSourceSettings | dict[str, Any]) -> KafkaSource:
        if not isinstance(settings, KafkaSourceSettings):
            settings = KafkaSourceSettings.model_validate(settings)
        return cls(settings)

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Join the group (lazily, on the first poll). SourceUnavailable if no broker answers."""
        if self._consumer is not None:
            return
        s = self.settings
        if self._snapshots is not None:
            # no record is released unchecked: without the check's connection the source does not start
            try:
                self._snapshots.open()
            except ProbeError as exc:
                raise SourceUnavailable(str(exc)) from exc
        if s.client == "kafka-python":
            warn_if_crc32c_pure_python()
        self._probe()
        self._tracker = _Tracker()
        self._consumer = open_group_consumer(s, self, self._factory)
        self._disconnected_since = None
        log.info("kafka_connected", group=s.group_id, topics=s.topics, pattern=s.topic_pattern, client=s.client)

    def _probe(self) -> None:
        probe_bootstrap(self.settings.bootstrap_servers, self.settings.connect_timeout)

    def close(self) -> None:
        """Leave the group. Commits what was acknowledged (never more); the rest is re-delivered."""
        if self._snapshots is not None:
            self._snapshots.close()
        if self.gate is not None:
            self.gate.clear()  # not acknowledged: re-delivered from the committed offsets
        self._paused = False
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        with contextlib.suppress(SourceUnavailable):
            self._commit(consumer, self._tracker.to_commit(), "close")
        consumer.close()

    # ------------------------------------------------------------------ consuming

    def poll(self, timeout: float) -> Sequence[Transaction | Rejected]:
        """Parsed records in partition order (partitions one after the other); [] after ``timeout``.

        With ``visibility_check_dsn``: only the prefix whose Postgres transactions (``source.txId``) a
        snapshot of that server sees; the rest is held, in order, across partitions (a record waits
        behind an invisible one even on another partition: simple, and only ever later, never
        reordered). While the head waits the consumer keeps polling (group membership), its partitions
        paused once ``max_poll_records`` are held."""
        gate = self.gate
        if gate is None:
            return self._poll_records(timeout)
        deadline = time.monotonic() + timeout
        while True:
            room = gate.held_changes < self.settings.max_poll_records
            self._pause(not room)
            wait = 0.0 if gate.held else max(0.0, deadline - time.monotonic())
            for item in self._poll_records(wait):
                gate.hold(item)
            out = gate.release()
            remaining = deadline - time.monotonic()
            if out or not gate.held or remaining <= 0:
                return out
            time.sleep(min(remaining, max(gate.next_check_in(), 0.0002)))

    def _pause(self, pause: bool) -> None:
        consumer = self._consumer
        if consumer is None or pause == self._paused:
            return
        consumer.set_paused(pause)
        self._paused = pause

    def _fetch_snapshot(self) -> Snapshot:
        assert self._snapshots is not None
        try:
            return self._snapshots.fetch()
        except ProbeError as exc:
            raise SourceUnavailable(str(exc)) from exc

    def visibility_wait(self) -> VisibilityWait | None:
        return self.gate.wait if self.gate is not None else None

    def visibility_counts(self) -> VisibilityCounts:
        return self.gate.take_counts() if self.gate is not None else VisibilityCounts(0, [], 0)

    def _poll_records(self, timeout: float) -> Sequence[Transaction | Rejected]:
        consumer = self._consumer
        if consumer is None:
            raise SourceUnavailable("not connected")
        batches = consumer.poll(timeout)
        out: list[Transaction | Rejected] = []
        skipped_any = False
        tracker = self._tracker
        for tp, records in batches.items():
            parsed = []
            options = self._options_for(tp.topic)
            origin = f"kafka:{tp.topic}/{tp.partition}"
            topic, partition = tp
            for offset, key, value in records:
                pos = KafkaPosition(topic, partition, offset)
                parsed.append((offset, parse_record(value, key, pos, origin, options)))
            with tracker.lock:
                part = tracker.parts.get(tp)
                if part is None:  # assigned between callbacks; normally created by on_partitions_assigned
                    part = tracker.parts[tp] = _Partition()
                for offset, item in parsed:
                    # a record fetched again within one assignment (a position reset) is not
                    # handed out twice: it is either pending an ack already or done
                    if part.deliver(offset, done=item is None):
                        if item is None:
                            skipped_any = True
                        else:
                            out.append(item)
                part.advance()
        self.delivered += len(out)
        self.skipped += sum(len(r) for r in batches.values()) - len(out)
        self.rejected += sum(1 for i in out if isinstance(i, Rejected))
        if not batches:
            self._check_connected(consumer)
        else:
            self._disconnected_since = None
        if skipped_any and not out:
            # only tombstones / foreign messages: nothing will be acked, so commit them now
            self._commit(consumer, tracker.to_commit(), "skip")
        self._update_lag(consumer)
        return out

    def _options_for(self, topic: str) -> ParseOptions:
        opts = self._options.get(topic)
        if opts is None:
            opts = self._options[topic] = self.settings.parse_options(topic)
        return opts

    def ack(self, positions: Sequence[Any]) -> None:
        """Redis holds everything these positions stand for: commit each partition's done prefix."""
        consumer = self._consumer
        tracker = self._tracker
        with tracker.lock:
            touched = set()
            for pos in positions:
                try:
                    topic, partition, offset = pos
                except (TypeError, ValueError):
                    continue  # not a Kafka position
                # TopicPartition is a (topic, partition) namedtuple: a plain tuple finds it
                part = tracker.parts.get((topic, partition))
                if part is not None and part.ack(offset):
                    touched.add((topic, partition))
                # else: revoked meanwhile (the new owner re-reads it) or acked twice
            for key in touched:
                tracker.parts[key].advance()
        if consumer is not None:
            self._commit(consumer, tracker.to_commit(), "ack")

    def _commit(self, consumer: GroupConsumer, offsets: dict[Any, int], why: str) -> None:
        if not offsets:
            return
        # refused: a rebalance, or we were too slow; the next owner re-reads from the last commit,
        # and the coming poll() drops our state for the revoked partitions
        if consumer.commit(offsets):
            self.committed(offsets, why)
        else:
            log.warning("kafka_commit_refused", why=why, offsets=offsets_text(offsets))

    # ------------------------------------------------------------------ rebalances (kafka_group.Rebalance)

    def assigned(self, parts: Sequence[Any]) -> None:
        with self._tracker.lock:
            for tp in parts:
                self._tracker.parts.setdefault(tp, _Partition())
        log.info("kafka_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in parts))

    def revoking(self, parts: Sequence[Any]) -> dict[Any, int]:
        self.rebalances += 1
        return self._tracker.to_commit(set(parts))

    def committed(self, offsets: dict[Any, int], why: str) -> None:
        self._tracker.committed(offsets)
        self.commits += 1
        if why == "revoke":
            log.info("kafka_committed", why=why, offsets=offsets_text(offsets))
        else:
            log.debug("kafka_committed", why=why, offsets=offsets_text(offsets))

    def forget(self, parts: Sequence[Any], why: str) -> None:
        """Partitions revoked (after their commit) or lost: what was delivered but not acked is re-read."""
        if why == "lost":
            self.rebalances += 1
        tracker = self._tracker
        with tracker.lock:
            dropped = {f"{tp.topic}/{tp.partition}": len(tracker.parts[tp].delivered) - len(tracker.parts[tp].acked)
                       for tp in parts if tp in tracker.parts}
            for tp in parts:
                tracker.parts.pop(tp, None)
        log.info("kafka_partitions_" + why, unacked_dropped={k: v for k, v in dropped.items() if v})

    def _check_connected(self, consumer: GroupConsumer) -> None:
        if consumer.connected():
            self._disconnected_since = None
            return
        now = time.monotonic()
        if self._disconnected_since is None:
            self._disconnected_since = now
        elif now - self._disconnected_since > self.settings.unavailable_after:
            self._disconnected_since = None
            raise SourceUnavailable(f"no connection to any Kafka broker for {self.settings.unavailable_after}s")

    # ------------------------------------------------------------------ observation

    def _update_lag(self, consumer: GroupConsumer) -> None:
        lag: dict[str, int] = {}
        total = 0
        with self._tracker.lock:
            parts = list(self._tracker.parts.items())
        for tp, part in parts:
            hw = consumer.highwater(tp)
            done = part.committable if part.committable is not None else part.committed
            if hw is None or done is None:
                continue
            lag[f"{tp.topic}/{tp.partition}"] = max(0, hw - done)
            total += max(0, hw - done)
        self._lag = {"lag_records": total, "lag_partitions": lag}

    def lag_stats(self) -> dict[str, Any]:
        """Records not yet acknowledged behind each partition's high watermark (as of the last poll).

        Computed on the poll thread and only read here: the daemon's monitor thread calls
        this, and a kafka-python consumer must not be used from two threads.
        """
        return dict(self._lag)

    def describe(self) -> dict[str, Any]:
        """Committed offset, done prefix and records awaiting an ack per partition, plus counters."""
        with self._tracker.lock:
            parts = {f"{tp.topic}/{tp.partition}": {"committed": p.committed, "done": p.committable,
                                                    "pending": len(p.delivered)}
                     for tp, p in sorted(self._tracker.parts.items())}
        return {"source": self.name, "group": self.settings.group_id, "connected": self._consumer is not None,
                "partitions": parts, "delivered": self.delivered, "skipped": self.skipped,
                "rejected": self.rejected, "commits": self.commits, "rebalances": self.rebalances,
                "client": self.settings.client, "crc32c": self._crc(), **self._lag}

    def _crc(self) -> str:
        """Who checks record CRCs: kafka-python's C package or its pure-Python fallback, or librdkafka (C)."""
        if self.settings.client == "confluent":
            return "librdkafka"
        return "native" if crc32c_is_native() else "pure-python"


