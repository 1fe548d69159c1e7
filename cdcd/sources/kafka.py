"""Kafka source: Debezium topics consumed with kafka-python in a consumer group.

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

Broker loss: kafka-python reconnects on its own and its ``poll`` just returns
nothing, which would look like an idle stream. After ``unavailable_after``
seconds without a connection to any broker, :meth:`poll` raises
:class:`SourceUnavailable`, the daemon closes the source, backs off and
connects again; uncommitted records are then re-delivered.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from cdcd.change import Rejected, Transaction
from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.debezium import PLACEHOLDER, ParseOptions, VersionMode, hint_schema, parse_record

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


class KafkaPosition(NamedTuple):
    """Where a record came from; what ``ack`` gets back. A plain tuple: (topic, partition, offset)."""

    topic: str
    partition: int
    offset: int


# ------------------------------------------------------------------------------ settings


class TopicOptions(BaseModel):
    """How to read the topics a ``topic_options`` key matches (exact name or fnmatch glob)."""

    model_config = ConfigDict(extra="forbid")

    version: VersionMode | None = Field(
        default=None, description="sequence (Postgres connector, commit order; lsn is an alias) or binlog "
                                  "(MySQL: file index * 2**32 + pos); "
                                  "default: the source's version")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="column -> type hint for records without a schema: int, float, bool, text, uuid, json, bytea, "
                    "decimal, decimal(SCALE), timestamp, timestamp_ms, timestamp_ns, timestamptz, date, time, time_ms")
    unavailable_placeholder: str = Field(default=PLACEHOLDER,
                                         description="the connector's unavailable.value.placeholder")

    @field_validator("columns")
    @classmethod
    def _hints(cls, v: dict[str, str]) -> dict[str, str]:
        for hint in v.values():
            hint_schema(hint)  # ValueError lists the valid hints
        return v


class KafkaSourceSettings(BaseModel):
    """``source: {type: kafka, ...}``: Debezium topics in a Kafka cluster."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["kafka"] = "kafka"
    bootstrap_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:9092"],
                                         description="host:port list (a comma-separated string is accepted)")
    group_id: str = Field(default="cdcd", min_length=1, description="consumer group; one group per keyspace")
    client_id: str = "cdcd"
    topics: list[str] | None = Field(default=None, description="topic names (or use topic_pattern)")
    topic_pattern: str | None = Field(default=None, description=r"regex of topics, e.g. ^dbserver1\.public\..*")
    version: VersionMode = Field(default="sequence", description="version of topics topic_options does not override")
    topic_options: dict[str, TopicOptions] = Field(
        default_factory=dict, description="per topic (exact name or glob, first match wins): version, column hints")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="where a new group starts: earliest replays the topics (harmless: versioned)")
    session_timeout_ms: int = Field(default=10000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3000, ge=100)
    max_poll_interval_ms: int = Field(default=300000, ge=1000,
                                      description="longer without poll (e.g. Redis down) and the group moves on")
    max_poll_records: int = Field(
        default=5000, ge=1, le=1_000_000,
        description="records per poll() at most, i.e. per daemon batch (one Redis round trip, one offset "
                    "commit); kafka-python's 500 was ~10% slower than 5000 on a quiet machine (issue 9)")
    fetch_max_wait_ms: int = Field(
        default=30, ge=0, le=10_000,
        description="how long the broker may hold a fetch waiting for fetch_min_bytes; the floor of "
                    "commit-to-invalidation latency at low rates (kafka-python's 500 gave p50 126-173 ms "
                    "at 100 changes/s, 30 gives ~50 ms; BENCHMARKS.md)")
    fetch_min_bytes: int = Field(
        default=1, ge=1, le=64 * 1024 * 1024,
        description="bytes the broker waits for (at most fetch_max_wait_ms) before answering a fetch; "
                    "1 answers as soon as anything arrived")
    max_partition_fetch_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="bytes per partition per fetch; at least the largest record (a bigger one still "
                    "comes through, alone)")
    fetch_max_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="bytes per fetch response over all partitions (a soft cap the broker applies)")
    request_timeout_ms: int = Field(default=30000, ge=1000)
    metadata_max_age_ms: int = Field(default=30000, ge=500,
                                     description="how soon a topic_pattern picks up a new table's topic")
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds to bootstrap before giving up (backoff)")
    unavailable_after: float = Field(default=10.0, gt=0,
                                     description="seconds without any broker connection before poll() gives up")
    dead_letter_topic: str = Field(default="cdcd.dlq", description="where rejected records are produced")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = Field(default=None, description="never logged")
    sasl_password_file: Path | None = Field(default=None, description="file holding the SASL password")
    ssl_cafile: str | None = Field(default=None, description="CA file for SSL / SASL_SSL")
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("topic_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"topic_pattern {v!r} is not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> KafkaSourceSettings:
        if bool(self.topics) == bool(self.topic_pattern):
            raise ValueError("set exactly one of topics (a list) or topic_pattern (a regex)")
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers is empty")
        if self.fetch_max_wait_ms >= self.request_timeout_ms:
            raise ValueError(f"fetch_max_wait_ms ({self.fetch_max_wait_ms}) must be below request_timeout_ms "
                             f"({self.request_timeout_ms}): a fetch the broker holds that long would time out")
        if self.max_partition_fetch_bytes > self.fetch_max_bytes:
            raise ValueError(f"max_partition_fetch_bytes ({self.max_partition_fetch_bytes}) must not exceed "
                             f"fetch_max_bytes ({self.fetch_max_bytes})")
        if self.fetch_min_bytes > self.fetch_max_bytes:
            raise ValueError(f"fetch_min_bytes ({self.fetch_min_bytes}) must not exceed fetch_max_bytes "
                             f"({self.fetch_max_bytes}): the broker would always wait fetch_max_wait_ms")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms (a third of it is usual)")
        if self.sasl_mechanism and not self.security_protocol.startswith("SASL"):
            raise ValueError("sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL")
        return self

    def parse_options(self, topic: str) -> ParseOptions:
        for pattern, opts in self.topic_options.items():
            if pattern == topic or fnmatch.fnmatchcase(topic, pattern):
                return ParseOptions(version=opts.version or self.version, hints=dict(opts.columns),
                                    placeholder=opts.unavailable_placeholder)
        return ParseOptions(version=self.version)

    def fetch_kwargs(self) -> dict[str, int]:
        """The consumer's fetch settings, under kafka-python's names (which are the same)."""
        return {"fetch_max_wait_ms": self.fetch_max_wait_ms, "fetch_min_bytes": self.fetch_min_bytes,
                "max_partition_fetch_bytes": self.max_partition_fetch_bytes,
                "fetch_max_bytes": self.fetch_max_bytes}

    def client_kwargs(self) -> dict[str, Any]:
        """Connection and security options shared by the consumer and the dead-letter producer."""
        kw: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "reconnect_backoff_max_ms": 1000,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_plain_username is not None:
                kw["sasl_plain_username"] = self.sasl_plain_username
            password = self.sasl_password()
            if password is not None:
                kw["sasl_plain_password"] = password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kw["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name):
                    kw[name] = getattr(self, name)
        return kw

    def sasl_password(self) -> str | None:
        if self.sasl_plain_password is not None:
            return self.sasl_plain_password.get_secret_value()
        if self.sasl_password_file is not None:
            try:
                return self.sasl_password_file.read_text().strip()
            except OSError as exc:
                raise SourceError(f"cannot read {self.sasl_password_file}: {exc.strerror}") from None
        return None


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
        self._consumer: Any = None
        self._tracker = _Tracker()
        self._options: dict[str, ParseOptions] = {}
        self._disconnected_since: float | None = None
        self._lag: dict[str, Any] = {}
        self.delivered = 0
        self.skipped = 0
        self.rejected = 0
        self.commits = 0
        self.rebalances = 0

    @classmethod
    def from_settings(cls, settings: KafkaSourceSettings | dict[str, Any]) -> KafkaSource:
        if not isinstance(settings, KafkaSourceSettings):
            settings = KafkaSourceSettings.model_validate(settings)
        return cls(settings)

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Join the group (lazily, on the first poll). SourceUnavailable if no broker answers."""
        import kafka.errors as kerr
        from kafka import AsyncConsumerRebalanceListener, KafkaConsumer

        if self._consumer is not None:
            return
        s = self.settings
        warn_if_crc32c_pure_python()
        self._probe()
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
            consumer = (self._factory or KafkaConsumer)(**kwargs)
        except (kerr.KafkaConfigurationError, ValueError, TypeError) as exc:
            raise SourceError(f"kafka consumer configuration: {exc}") from exc
        except (kerr.KafkaError, OSError) as exc:
            raise SourceUnavailable(f"cannot bootstrap from {','.join(s.bootstrap_servers)}: {exc}") from exc
        self._tracker = _Tracker()
        AsyncConsumerRebalanceListener.register(_Listener)  # an ABC: what subscribe() checks for
        listener = _Listener(self, consumer, self._tracker)
        if s.topic_pattern:
            consumer.subscribe(pattern=s.topic_pattern, listener=listener)
        else:
            consumer.subscribe(topics=list(s.topics or ()), listener=listener)
        self._consumer = consumer
        self._disconnected_since = None
        log.info("kafka_connected", group=s.group_id, topics=s.topics, pattern=s.topic_pattern)

    def _probe(self) -> None:
        probe_bootstrap(self.settings.bootstrap_servers, self.settings.connect_timeout)

    def close(self) -> None:
        """Leave the group. Commits what was acknowledged (never more); the rest is re-delivered."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        with contextlib.suppress(SourceUnavailable):
            self._commit(consumer, self._tracker.to_commit(), "close")
        # leaving the group needs the broker; without one, waiting only delays the reconnect
        timeout_ms = 5000 if _broker_connected(consumer) else 500
        try:
            consumer.close(autocommit=False, timeout_ms=timeout_ms)
        except Exception as exc:  # closing must not fail the caller: the group times us out anyway
            log.warning("kafka_close_failed", error=str(exc))

    # ------------------------------------------------------------------ consuming

    def poll(self, timeout: float) -> Sequence[Transaction | Rejected]:
        """Parsed records in partition order (partitions one after the other); [] after ``timeout``."""
        import kafka.errors as kerr

        consumer = self._consumer
        if consumer is None:
            raise SourceUnavailable("not connected")
        try:
            batches = consumer.poll(timeout_ms=max(0, int(timeout * 1000)))
        except kerr.AuthorizationError as exc:
            raise SourceError(f"not authorized to consume: {exc}") from exc
        except kerr.KafkaError as exc:
            raise SourceUnavailable(f"kafka poll failed: {exc}") from exc
        out: list[Transaction | Rejected] = []
        skipped_any = False
        tracker = self._tracker
        for tp, records in batches.items():
            parsed = []
            options = self._options_for(tp.topic)
            origin = f"kafka:{tp.topic}/{tp.partition}"
            for rec in records:
                pos = KafkaPosition(rec.topic, rec.partition, rec.offset)
                parsed.append((rec.offset, parse_record(rec.value, rec.key, pos, origin, options)))
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

    def _commit(self, consumer: Any, offsets: dict[Any, int], why: str) -> None:
        import kafka.errors as kerr
        from kafka import OffsetAndMetadata

        if not offsets:
            return
        group_moved_on = (kerr.CommitFailedError, kerr.IllegalStateError, kerr.IllegalGenerationError,
                          kerr.UnknownMemberIdError, kerr.RebalanceInProgressError, kerr.FencedInstanceIdError)
        try:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                            timeout_ms=self.settings.request_timeout_ms)
        except group_moved_on as exc:
            # a rebalance, or we were too slow: the next owner re-reads from the last commit,
            # and the coming poll() drops our state for the revoked partitions
            log.warning("kafka_commit_refused", why=why, error=str(exc), offsets=_fmt(offsets))
            return
        except kerr.AuthorizationError as exc:
            raise SourceError(f"not authorized to commit offsets for group {self.settings.group_id!r}: {exc}") \
                from exc
        except (kerr.KafkaError, OSError) as exc:
            raise SourceUnavailable(f"offset commit failed: {exc}") from exc
        self._tracker.committed(offsets)
        self.commits += 1
        log.debug("kafka_committed", why=why, offsets=_fmt(offsets))

    def _check_connected(self, consumer: Any) -> None:
        if _broker_connected(consumer):
            self._disconnected_since = None
            return
        now = time.monotonic()
        if self._disconnected_since is None:
            self._disconnected_since = now
        elif now - self._disconnected_since > self.settings.unavailable_after:
            self._disconnected_since = None
            raise SourceUnavailable(f"no connection to any Kafka broker for {self.settings.unavailable_after}s")

    # ------------------------------------------------------------------ observation

    def _update_lag(self, consumer: Any) -> None:
        lag: dict[str, int] = {}
        total = 0
        with self._tracker.lock:
            parts = list(self._tracker.parts.items())
        for tp, part in parts:
            try:
                hw = consumer.highwater(tp)
            except Exception:
                hw = None
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
                "crc32c": "native" if crc32c_is_native() else "pure-python", **self._lag}


def _fmt(offsets: dict[Any, int]) -> dict[str, int]:
    return {f"{tp.topic}/{tp.partition}": off for tp, off in offsets.items()}


def _broker_connected(consumer: Any) -> bool:
    """Is any broker connection up? kafka-python has no public call for this; degrade to True."""
    try:
        client = consumer._client
        brokers = client.cluster.brokers()
        if not brokers:
            return False
        return any(client.connected(b.node_id) for b in brokers)
    except AttributeError:
        return True


class _Listener:
    """Rebalance callbacks (an ``AsyncConsumerRebalanceListener``, registered as one in ``connect``).

    They run on kafka-python's IO thread while ``poll()`` (or ``close()``) blocks on it, so
    they are async: a blocking consumer call from there would deadlock.
    """

    def __init__(self, source: KafkaSource, consumer: Any, tracker: _Tracker) -> None:
        self.source = source
        self.consumer = consumer
        self.tracker = tracker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if not revoked:
            return  # the first join also "revokes" the empty assignment
        self.source.rebalances += 1
        offsets = self.tracker.to_commit(set(revoked))
        if offsets:
            await self._commit(offsets)
        self._forget(revoked, "revoked")

    async def on_partitions_lost(self, lost: Any) -> None:
        # evicted from the group: committing would be refused; the new owner re-reads
        if not lost:
            return
        self.source.rebalances += 1
        self._forget(lost, "lost")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        with self.tracker.lock:
            for tp in assigned:
                self.tracker.parts.setdefault(tp, _Partition())
        log.info("kafka_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    def _forget(self, tps: Any, why: str) -> None:
        with self.tracker.lock:
            dropped = {f"{tp.topic}/{tp.partition}": len(self.tracker.parts[tp].delivered) - len(
                self.tracker.parts[tp].acked) for tp in tps if tp in self.tracker.parts}
            for tp in tps:
                self.tracker.parts.pop(tp, None)
        log.info("kafka_partitions_" + why, unacked_dropped={k: v for k, v in dropped.items() if v})

    async def _commit(self, offsets: dict[Any, int]) -> None:
        """Commit while we still own the partitions, through the coordinator's own coroutine.

        ``consumer.commit()`` blocks on the IO thread we are running on, so it cannot be
        used here; kafka-python's coordinator awaits this same coroutine for its
        pre-rebalance auto-commit. If a future kafka-python renames it, nothing is lost:
        the offsets stay uncommitted and are re-delivered to the next owner.
        """
        from kafka import OffsetAndMetadata

        commit = getattr(getattr(self.consumer, "_coordinator", None), "_commit_offsets_sync_async", None)
        if commit is None or not inspect.iscoroutinefunction(commit):
            log.warning("kafka_revoke_commit_unsupported", offsets=_fmt(offsets))
            return
        try:
            await commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}, timeout_ms=5000)
        except Exception as exc:
            log.warning("kafka_revoke_commit_failed", error=str(exc), offsets=_fmt(offsets))
            return
        self.tracker.committed(offsets)
        self.source.commits += 1
        log.info("kafka_committed", why="revoke", offsets=_fmt(offsets))
