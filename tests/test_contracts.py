"""The daemon's explicit contracts: source capabilities, dead-letter destinations, and the sink as the
only writer of cdcd's Redis state (issue 11, item 2)."""

from __future__ import annotations

import time
from typing import Any

import redis

from cdcd.backplane import Message, Sequencer
from cdcd.config import PostgresSourceSettings
from cdcd.keyspace import Keyspace
from cdcd.sinks.base import DeadLetters
from cdcd.sinks.kafka_dlq import KafkaDeadLetters
from cdcd.sinks.redis import RedisDeadLetters, RedisSink
from cdcd.sources.base import GuardsSchema, KeepsAlive, ReportsLag, SlotSource, Source, SourceError
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from cdcd.sources.postgres import PostgresSource
from tests.helpers import DaemonThread, entry, make_config, unique, wait_until


def _pg(cfg: dict[str, Any], **over: Any) -> PostgresSource:
    config = make_config(cfg)
    assert isinstance(config.source, PostgresSourceSettings)
    return PostgresSource(config.source.model_copy(update=over), config.rules().source)


def test_sources_declare_their_capabilities(cfg: dict[str, Any]) -> None:
    pg = _pg(cfg)
    assert isinstance(pg, Source)
    assert isinstance(pg, KeepsAlive) and isinstance(pg, SlotSource) and isinstance(pg, ReportsLag)
    assert isinstance(pg, GuardsSchema)
    assert pg.creates_slot is True and _pg(cfg, create_slot=False).creates_slot is False
    kafka = KafkaSource(KafkaSourceSettings(bootstrap_servers="127.0.0.1:1", topics=["t"]))
    assert isinstance(kafka, Source) and isinstance(kafka, ReportsLag)
    assert not isinstance(kafka, KeepsAlive) and not isinstance(kafka, SlotSource)
    assert not isinstance(kafka, GuardsSchema)


def test_dead_letter_destinations_implement_the_protocol(r: redis.Redis) -> None:
    destinations: list[DeadLetters] = [RedisDeadLetters(r, unique("dl")), KafkaDeadLetters(topic="t")]
    for d in destinations:
        assert callable(d.send) and callable(d.close)
        d.close()  # nothing opened yet: closing is harmless


def test_sink_numbers_and_publishes_idle_heartbeats(cfg: dict[str, Any], r: redis.Redis) -> None:
    rules = make_config(cfg).rules()
    ks = rules.keyspace
    seq = Sequencer("cdcd")
    sink = RedisSink(r, rules, seq, "pg:test")
    sink.prepare()
    sub: Any = r.pubsub()
    sub.subscribe(ks.channel)
    assert sub.get_message(timeout=5) is not None  # the subscription confirmation
    seq.seq = 41
    assert sink.idle_heartbeat(1234) is False  # the registry (run marker) is there
    msg = None
    deadline = time.monotonic() + 5
    while msg is None and time.monotonic() < deadline:
        msg = sub.get_message(timeout=1)
    assert msg is not None
    got = Message.decode(msg["data"])
    assert (got.origin, got.run, got.seq, got.version, got.keys, got.tags) == ("cdcd", seq.run, 42, "1234", [], [])
    assert seq.seq == 42
    r.delete(ks.registry)  # Redis lost its memory: the heartbeat notices and restores the registry
    assert sink.idle_heartbeat(1234) is True and r.exists(ks.registry)
    assert seq.seq == 43
    sub.close()


def test_sink_forgets_the_source_after_a_lost_slot(cfg: dict[str, Any], r: redis.Redis) -> None:
    rules = make_config(cfg).rules()
    sink = RedisSink(r, rules, Sequencer("cdcd"), "pg:test")
    r.hset(Keyspace(rules.keyspace.prefix).applied, mapping={"source": "pg:test", "version": "7"})
    assert sink.applied_state()["source"] == "pg:test"
    sink.forget_source()
    assert sink.applied_state() == {"source": "", "version": "7"}


def test_dropped_slot_with_creation_off_stops_the_daemon(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    """A lost slot that the source will not re-create (``creates_slot`` False) is an operator's problem."""
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
    wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="applied")
    d.stop()
    sql("SELECT pg_drop_replication_slot(%s)", (cfg["source"]["slot"],))
    cfg["source"]["create_slot"] = False
    d = DaemonThread(make_config(cfg)).start(wait=False)
    d.thread.join(15)
    assert isinstance(d.error, SourceError)
    assert "was dropped and create_slot is off" in str(d.error)
    assert d.daemon.metrics.errors.labels("slot_lost")._value.get() == 1
