"""The source settings models (``source:`` in the configuration), side by side.

Only pydantic, the standard library and cdcd's driver-free modules are imported here:
loading a configuration never imports a database or Kafka driver, so a Kafka-only install can
read its file and a Postgres one never pays for kafka-python.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from cdcd.secret import read_secret
from cdcd.sources.base import SourceError
from cdcd.sources.debezium import PLACEHOLDER, ParseOptions, VersionMode, hint_schema


class PostgresSourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["postgres"] = "postgres"
    dsn: str = Field(description="libpq connection string or URL of the database whose changes are cached")
    slot: str = Field(default="cdcd", pattern=r"^[a-z0-9_]{1,63}$")
    publication: str = Field(default="cdcd", pattern=r"^[A-Za-z0-9_]{1,63}$")
    create_slot: bool = Field(default=True, description="create the slot when missing (else refuse to start)")
    create_publication: bool = Field(default=True, description="create/extend the publication for the rules' tables")
    status_interval: float = Field(default=1.0, gt=0, description="seconds between standby status updates")
    max_batch: int = Field(default=5000, ge=1, description="changes per Redis pipeline at most")
    watermark_interval: float = Field(
        default=1.0, ge=0, description="while idle, seconds between keepalive requests that move the applied "
                                        "watermark (read-your-writes) to the server's WAL end; 0 = off")
    max_transaction_changes: int = Field(
        default=20_000, ge=1, description="row changes buffered per transaction; past it the transaction degrades "
                                          "to one table-wide invalidation per table it touched")
    max_transaction_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="pgoutput row bytes buffered per transaction; past it the "
                                                   "transaction degrades like max_transaction_changes")
    password: SecretStr | None = Field(default=None, description="overrides a password in the DSN; never logged")
    password_file: Path | None = Field(default=None, description="file holding the password (Docker/K8s secret)")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: str | None = Field(default=None, description="CA file for sslmode verify-ca / verify-full")

    def conninfo(self) -> str:
        """The DSN with password and TLS options merged in (libpq keywords; URLs are accepted too)."""
        from psycopg.conninfo import make_conninfo

        extra: dict[str, str] = {}
        secret = read_secret(self.password, self.password_file)
        if secret is not None:
            extra["password"] = secret
        if self.sslmode:
            extra["sslmode"] = self.sslmode
        if self.sslrootcert:
            extra["sslrootcert"] = self.sslrootcert
        return make_conninfo(self.dsn, **extra) if extra else self.dsn


# ------------------------------------------------------------------------------ kafka (Debezium topics)


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
    client: Literal["kafka-python", "confluent"] = Field(
        default="kafka-python",
        description="the Kafka client library: kafka-python (pure Python, the default) or confluent "
                    "(librdkafka via confluent-kafka, the kafka-fast extra: ~1/5 of the CPU per record; "
                    "docs/kafka.md#choosing-the-client)")
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
    visibility_check_dsn: SecretStr | None = Field(
        default=None, description="libpq DSN of the Postgres primary Debezium reads: a record with source.txId "
                                  "is handed on only once a snapshot there sees its transaction, so a "
                                  "tombstone never lands before readers can see the commit (docs/kafka.md); "
                                  "never logged")
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
