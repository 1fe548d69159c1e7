"""KafkaSource against a real broker (tansu): offsets move only on ack, never past a gap; rebalances lose nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from cdcd.change import Rejected, Transaction
from cdcd.devservers import KafkaServer, free_port
from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.kafka import KafkaPosition, KafkaSource, KafkaSourceSettings
from tests.helpers import unique, wait_until


def change(i: int, table: str = "items") -> bytes:
    """A schemaless Debezium insert whose LSN is ``1000 + i`` (so the version tells which record it was)."""
    return json.dumps({"before": None, "after": {"id": i}, "op": "c", "ts_ms": 1,
                       "source": {"connector": "postgresql", "schema": "public", "table": table, "lsn": 1000 + i,
                                  "txId": i, "ts_ms": 1}}).encode()


def produce(producer: KafkaProducer, topic: str, ids: range | list[int], partition: int | None = None) -> None:
    for i in ids:
        producer.send(topic, key=json.dumps({"id": i}).encode(), value=change(i), partition=partition)
    producer.flush()


def drain(source: KafkaSource, n: int, timeout: float = 30.0) -> list[Transaction | Rejected]:
    """Poll until ``n`` items arrived (no acks)."""
    out: list[Transaction | Rejected] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"got {len(out)} of {n} items"
        out.extend(source.poll(0.2))
    return out


def ids(items: Sequence[Transaction | Rejected]) -> list[int]:
    return [t.version - 1000 for t in items if isinstance(t, Transaction)]


def committed(kafka_server: KafkaServer, group: str, topic: str, partition: int = 0) -> int | None:
    c = KafkaConsumer(bootstrap_servers=kafka_server.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, partition))  # type: ignore[no-any-return]
    finally:
        c.close(autocommit=False)


def test_unacked_records_are_read_again_by_the_group(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer) -> None:
    topic = make_topic()
    produce(producer, topic, range(5))
    group = unique("g")
    first = make_source(topics=[topic], group_id=group)
    items = drain(first, 5)
    assert ids(items) == [0, 1, 2, 3, 4]
    assert [t.position for t in items] == [KafkaPosition(topic, 0, o) for o in range(5)]
    first.close()
    assert committed(kafka_server, group, topic) is None  # nothing was acknowledged
    second = make_source(topics=[topic], group_id=group)
    assert ids(drain(second, 5)) == [0, 1, 2, 3, 4]


def test_ack_commits_only_the_acknowledged_prefix(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer) -> None:
    topic = make_topic()
    produce(producer, topic, range(6))
    group = unique("g")
    source = make_source(topics=[topic], group_id=group)
    items = drain(source, 6)
    by_offset = {t.position.offset: t.position for t in items}
    source.ack([by_offset[0], by_offset[1], by_offset[3], by_offset[4]])  # 2 is still being applied
    assert committed(kafka_server, group, topic) == 2  # offset+1 of the highest contiguous ack, not 5
    assert source.describe()["partitions"][f"{topic}/0"]["pending"] == 4  # 2, 3, 4, 5
    source.ack([by_offset[2]])
    assert committed(kafka_server, group, topic) == 5
    source.ack([by_offset[2], ("other-topic", 0, 99), "not a position"])  # repeats and strangers are ignored
    assert committed(kafka_server, group, topic) == 5
    source.close()
    again = make_source(topics=[topic], group_id=group)
    assert ids(drain(again, 1)) == [5]  # only the unacknowledged record comes back


def test_commits_per_partition_and_pattern_subscription(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer) -> None:
    prefix = unique("srv")
    a = make_topic(partitions=2, name=f"{prefix}.public.a")
    b = make_topic(name=f"{prefix}.public.b")
    make_topic(name=f"other{prefix}.public.c")  # must not match
    produce(producer, a, [0, 1, 2], partition=0)
    produce(producer, a, [10, 11], partition=1)
    produce(producer, b, [20], partition=0)
    produce(producer, f"other{prefix}.public.c", [30])
    group = unique("g")
    source = make_source(topic_pattern=rf"^{prefix}\..*", group_id=group)
    items = drain(source, 6)
    assert sorted(ids(items)) == [0, 1, 2, 10, 11, 20]
    per_partition: dict[tuple[str, int], list[int]] = {}
    for t in items:
        per_partition.setdefault((t.position.topic, t.position.partition), []).append(t.position.offset)
    assert all(offsets == sorted(offsets) for offsets in per_partition.values())  # in order per partition
    source.ack([t.position for t in items if t.position.topic == a and t.position.partition == 1])
    assert committed(kafka_server, group, a, 1) == 2
    assert committed(kafka_server, group, a, 0) is None
    assert committed(kafka_server, group, b, 0) is None


def test_tombstones_and_foreign_messages_are_committed_without_an_ack(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer) -> None:
    topic = make_topic()
    produce(producer, topic, [0])
    producer.send(topic, key=b'{"id":0}', value=None)  # delete tombstone
    producer.send(topic, key=b'{"prefix":"x"}', value=json.dumps(
        {"op": "m", "source": {"lsn": 5}, "message": {"prefix": "x", "content": "AP8="}}).encode())
    producer.flush()
    group = unique("g")
    source = make_source(topics=[topic], group_id=group)
    items = drain(source, 1)
    assert ids(items) == [0]
    # the skipped records sit behind an unacked one: nothing may be committed yet
    assert committed(kafka_server, group, topic) is None
    source.ack([items[0].position])
    assert committed(kafka_server, group, topic) == 3
    producer.send(topic, key=b'{"id":0}', value=None)
    producer.flush()
    wait_until(lambda: source.poll(0.1) == [] and committed(kafka_server, group, topic) == 4, 15,
               what="a lone tombstone committed by poll")


def test_acknowledged_offsets_are_committed_when_partitions_are_revoked(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack whose commit did not go through (a coordinator hiccup) is committed by the revocation
    callback before the partition moves to another member, so the new owner does not redo it."""
    topic = make_topic(partitions=2)
    produce(producer, topic, [0, 1], partition=0)
    produce(producer, topic, [2, 3], partition=1)
    group = unique("g")
    a = make_source(topics=[topic], group_id=group)
    items = drain(a, 4)
    real_commit = a._commit
    monkeypatch.setattr(a, "_commit", lambda *args, **kw: None)  # the ack's commit is lost
    a.ack([t.position for t in items])
    assert committed(kafka_server, group, topic, 0) is None
    monkeypatch.setattr(a, "_commit", real_commit)
    b = make_source(topics=[topic], group_id=group)  # joining makes the group rebalance
    deadline = time.monotonic() + 30
    while committed(kafka_server, group, topic, 0) != 2 or committed(kafka_server, group, topic, 1) != 2:
        assert time.monotonic() < deadline, "revocation did not commit the acknowledged offsets"
        assert a.poll(0.2) == [] and b.poll(0.2) == []  # nothing is re-delivered to anyone
    assert a.rebalances >= 1


class Member:
    """The second group member: a KafkaSource in a thread (left by close()) or in a process (SIGKILLed).

    It acknowledges its first two non-empty polls, then only polls; ``acked`` and ``unacked``
    collect the record ids it reported either way.
    """

    def __init__(self, how: str, kafka_server: KafkaServer, topic: str, group: str,
                 make_source: Callable[..., KafkaSource], client: str) -> None:
        self.how = how
        self.acked: set[int] = set()
        self.unacked: set[int] = set()
        self.stop_flag = threading.Event()
        if how == "close":
            self.source = make_source(topics=[topic], group_id=group, max_poll_records=20)
            self.thread = threading.Thread(target=self._run_thread)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.kafka.consumer_process", kafka_server.bootstrap, topic, group, "2",
                 client],
                stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
            self.thread = threading.Thread(target=self._read_proc)
        self.thread.start()

    def _report(self, acked: bool, ids_: list[int]) -> None:
        (self.acked if acked else self.unacked).update(ids_)

    def _run_thread(self) -> None:
        polls = 0
        while not self.stop_flag.is_set():
            items = self.source.poll(0.2)
            if items:
                polls += 1
                if polls <= 2:
                    self.source.ack([t.position for t in items])
                self._report(polls <= 2, ids(items))
        self.source.close()  # a clean leave: its partitions are revoked and handed over at once

    def _read_proc(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith((b'{"acked"', b'{"unacked"')):
                continue  # the source's own log lines
            msg = json.loads(line)
            self._report("acked" in msg, msg.get("acked", msg.get("unacked")))

    def stop(self) -> None:
        if self.how == "close":
            self.stop_flag.set()
        else:
            self.proc.send_signal(signal.SIGKILL)  # no leave: the group notices by session timeout
            self.proc.wait(10)
        self.thread.join(30)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["close", "kill"])
def test_rebalance_hands_unacked_records_to_the_survivor(
        how: str, make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource],
        kafka_server: KafkaServer, kafka_client: str) -> None:
    """Two members share four partitions; one leaves mid-stream (closed, or SIGKILLed) holding records it
    never acknowledged. Every record must end up acknowledged by someone: the survivor gets the orphans,
    and at the end the group's committed offsets are the partitions' ends."""
    topic = make_topic(partitions=4)
    group = unique("g")
    a = make_source(topics=[topic], group_id=group, max_poll_records=20)
    b = Member(how, kafka_server, topic, group, make_source, kafka_client)
    produced = 200
    produce(producer, topic, range(produced))
    seen_a: set[int] = set()

    def step() -> None:
        items = a.poll(0.2)
        seen_a.update(ids(items))
        a.ack([t.position for t in items])

    try:
        deadline = time.monotonic() + 60
        while not b.unacked or not seen_a:
            assert time.monotonic() < deadline, f"group never shared the partitions: a={len(seen_a)} b={b.acked}"
            step()
            if len(seen_a) + len(b.acked) >= produced:
                # on a busy machine b may join after a drained everything: keep records coming until b
                # holds some it never acknowledged
                produce(producer, topic, range(produced, produced + 20))
                produced += 20
    finally:
        b.stop()
    orphans = set(b.unacked)
    assert orphans, "the test needs b to leave records unacknowledged"
    total = produced + 200
    produce(producer, topic, range(produced, total))  # more arrives while the group rebalances
    deadline = time.monotonic() + 90
    while not (set(range(total)) <= seen_a | b.acked and orphans <= seen_a):
        assert time.monotonic() < deadline, (
            f"lost: {sorted(set(range(total)) - seen_a - b.acked)[:20]}, "
            f"orphans not re-read: {sorted(orphans - seen_a)[:20]}")
        step()
    # the survivor committed everything: in a fresh topic offsets run 0..n-1 per partition, so the
    # group's committed offsets add up to the number of records exactly when nothing is left
    tps = [TopicPartition(topic, p) for p in range(4)]
    probe = KafkaConsumer(bootstrap_servers=kafka_server.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        assert sum(probe.committed(tp) or 0 for tp in tps) == total
    finally:
        probe.close(autocommit=False)


@pytest.mark.slow
def test_broker_loss_raises_source_unavailable_and_reconnect_resumes(
        make_source: Callable[..., KafkaSource]) -> None:
    server = KafkaServer()
    server.start()
    try:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=server.bootstrap)
        admin.create_topics([NewTopic("t", 1, 1)])
        admin.close()
        p = KafkaProducer(bootstrap_servers=server.bootstrap)
        produce(p, "t", [1])
        p.close()
        source = make_source(bootstrap_servers=server.bootstrap, topics=["t"], unavailable_after=1.0)
        assert ids(drain(source, 1)) == [1]
        assert server.proc is not None
        server.proc.kill()  # a broker crash (and faster than tansu's ignored SIGTERM)
        server.proc.wait(10)
        with pytest.raises(SourceUnavailable):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                source.poll(0.2)
        source.close()
        with pytest.raises(SourceUnavailable):
            source.connect()  # nothing listens: refused fast, no consumer (and no IO thread) built
        server.start()  # same port, an empty in-memory broker again
        admin = KafkaAdminClient(bootstrap_servers=server.bootstrap)
        admin.create_topics([NewTopic("t", 1, 1)])
        admin.close()
        p = KafkaProducer(bootstrap_servers=server.bootstrap)
        produce(p, "t", [2])
        p.close()
        source.connect()
        assert ids(drain(source, 1)) == [2]
    finally:
        server.stop()


def test_connect_to_nothing_is_unavailable_fast(kafka_client: str) -> None:
    settings = KafkaSourceSettings(bootstrap_servers=[f"127.0.0.1:{free_port()}"], topics=["t"],
                                   client=kafka_client)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match="no Kafka broker reachable"):
        KafkaSource(settings).connect()
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(("data", "message"), [
    ({}, "exactly one of topics"),
    ({"topics": ["a"], "topic_pattern": "b"}, "exactly one of topics"),
    ({"topic_pattern": "("}, "not a regular expression"),
    ({"topics": ["a"], "heartbeat_interval_ms": 10000}, "heartbeat_interval_ms"),
    ({"topics": ["a"], "topic_options": {"a": {"columns": {"x": "datetime"}}}}, "unknown column type hint"),
    ({"topics": ["a"], "version": "scn"}, "version"),
])
def test_settings_validation(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaSourceSettings.model_validate(data)


def test_settings_topic_options_and_defaults() -> None:
    s = KafkaSourceSettings.model_validate({
        "bootstrap_servers": "k1:9092, k2:9092", "topic_pattern": r"^dbserver1\..*",
        "topic_options": {"dbserver1.public.legacy": {"columns": {"ts": "timestamp"}},
                          "mysql.*": {"version": "binlog"}}})
    assert s.bootstrap_servers == ["k1:9092", "k2:9092"]
    assert (s.session_timeout_ms, s.heartbeat_interval_ms, s.dead_letter_topic) == (10000, 3000, "cdcd.dlq")
    assert s.parse_options("dbserver1.public.legacy").hints == {"ts": "timestamp"}
    assert s.parse_options("mysql.inventory.customers").version == "binlog"
    assert s.parse_options("dbserver1.public.users").version == "sequence"
    assert KafkaSource.from_settings(s.model_dump()).name == "kafka:cdcd"


def test_confluent_client_without_the_package_is_a_clear_error(
        kafka_server: KafkaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``client: confluent`` on a machine without confluent-kafka: a SourceError that says what to install."""
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # what an import finds when it is not installed
    monkeypatch.delitem(sys.modules, "cdcd.sources.kafka_confluent_consumer", raising=False)
    source = KafkaSource(KafkaSourceSettings(bootstrap_servers=[kafka_server.bootstrap], topics=["t"],
                                             client="confluent"))
    with pytest.raises(SourceError, match=r"confluent-kafka is not installed: pip install 'cdcd\[kafka-fast\]'"):
        source.connect()
