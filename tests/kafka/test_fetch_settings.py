"""The consumer's fetch settings: measured defaults, precise validation errors, and what reaches kafka-python."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer
from pydantic import ValidationError

from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings
from cdcd.sources.kafka_confluent_consumer import consumer_config
from tests.kafka.test_kafka_source import drain, ids, produce

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_measured_ones() -> None:
    s = KafkaSourceSettings.model_validate({"topics": ["t"]})
    # kafka-python's own defaults are 500 ms and 500 records: see BENCHMARKS.md, "Kafka path"
    assert (s.fetch_max_wait_ms, s.max_poll_records) == (30, 5000)
    assert (s.fetch_min_bytes, s.max_partition_fetch_bytes, s.fetch_max_bytes) == (1, 1024 * 1024, 50 * 1024 * 1024)


@pytest.mark.parametrize(("data", "loc", "message"), [
    ({"fetch_max_wait_ms": -1}, "fetch_max_wait_ms", "greater than or equal to 0"),
    ({"fetch_max_wait_ms": 10_001}, "fetch_max_wait_ms", "less than or equal to 10000"),
    ({"fetch_max_wait_ms": "soon"}, "fetch_max_wait_ms", "valid integer"),
    ({"max_poll_records": 0}, "max_poll_records", "greater than or equal to 1"),
    ({"fetch_min_bytes": 0}, "fetch_min_bytes", "greater than or equal to 1"),
    ({"max_partition_fetch_bytes": 100}, "max_partition_fetch_bytes", "greater than or equal to 1024"),
])
def test_out_of_range_values_name_the_field_and_the_bound(data: dict[str, Any], loc: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        KafkaSourceSettings.model_validate({"topics": ["t"], **data})
    (error,) = info.value.errors()
    assert error["loc"] == (loc,)
    assert message in error["msg"]


@pytest.mark.parametrize(("data", "message"), [
    ({"fetch_max_wait_ms": 5000, "request_timeout_ms": 5000},
     r"fetch_max_wait_ms \(5000\) must be below request_timeout_ms \(5000\)"),
    ({"max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_bytes": 1024 * 1024},
     r"max_partition_fetch_bytes \(4194304\) must not exceed fetch_max_bytes \(1048576\)"),
    ({"fetch_min_bytes": 2 * 1024 * 1024, "fetch_max_bytes": 1024 * 1024},
     r"fetch_min_bytes \(2097152\) must not exceed fetch_max_bytes \(1048576\)"),
])
def test_inconsistent_combinations_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSourceSettings.model_validate({"topics": ["t"], **data})


def test_example_config_shows_every_fetch_setting_with_its_default() -> None:
    data = yaml.safe_load((ROOT / "config" / "cdcd.kafka.example.yaml").read_text())
    source = data["source"]
    defaults = KafkaSourceSettings.model_validate({"topics": ["t"]})
    for name in ("fetch_max_wait_ms", "max_poll_records", "fetch_min_bytes", "max_partition_fetch_bytes"):
        assert source[name] == getattr(defaults, name), name
    doc = (ROOT / "docs" / "kafka.md").read_text()
    for name in ("fetch_max_wait_ms", "max_poll_records", "fetch_min_bytes", "max_partition_fetch_bytes",
                 "fetch_max_bytes", "crc32c"):
        assert f"`{name}`" in doc, name


def test_settings_reach_the_consumer_and_records_flow(
        make_topic: Callable[..., str], producer: KafkaProducer, make_source: Callable[..., KafkaSource]) -> None:
    topic = make_topic()
    produce(producer, topic, range(7))
    source = make_source(topics=[topic], fetch_max_wait_ms=7, max_poll_records=3, fetch_min_bytes=1,
                         max_partition_fetch_bytes=64 * 1024, fetch_max_bytes=1024 * 1024)
    if source.settings.client == "kafka-python":
        config = source._consumer.consumer.config  # type: ignore[union-attr]
        assert (config["fetch_max_wait_ms"], config["max_poll_records"], config["fetch_min_bytes"]) == (7, 3, 1)
        assert (config["max_partition_fetch_bytes"], config["fetch_max_bytes"]) == (64 * 1024, 1024 * 1024)
    else:  # librdkafka does not read its configuration back: what it was given
        conf = consumer_config(source.settings)
        assert (conf["fetch.wait.max.ms"], conf["fetch.min.bytes"]) == (7, 1)
        assert (conf["max.partition.fetch.bytes"], conf["fetch.max.bytes"]) == (64 * 1024, 1024 * 1024)
    first = drain(source, 1)
    assert 1 <= len(first) <= 3  # max_poll_records bounds one poll
    assert ids(first + drain(source, 7 - len(first))) == list(range(7))
