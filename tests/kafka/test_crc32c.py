"""The C CRC-32C check: detected when kafka-python uses it, one warning when it does not, records flow either way.

kafka-python binds its CRC function when ``kafka.record.util`` is imported, so the
pure-Python case runs in a fresh interpreter where ``crc32c`` cannot be imported
(``sys.modules["crc32c"] = None``), exactly what a machine without the package sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer

from cdcd.devservers import KafkaServer
from cdcd.sources.kafka import KafkaSource, crc32c_is_native
from tests.kafka.test_kafka_source import drain, ids, produce

ROOT = Path(__file__).resolve().parents[2]

# Consumes ``n`` records from a topic through KafkaSource (connecting twice: the warning is once per
# process), then prints one JSON line with what it saw; structlog's default output goes to stdout too.
CONSUME = """
import json, sys, time
{block}
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings, crc32c_is_native
bootstrap, topic, group, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
settings = KafkaSourceSettings.model_validate({{"bootstrap_servers": bootstrap, "group_id": group, "topics": [topic],
                                               "session_timeout_ms": 3000, "heartbeat_interval_ms": 500}})
got = []
for attempt in range(2):
    source = KafkaSource(settings)
    source.connect()
    deadline = time.monotonic() + 30
    while len(got) < n * (attempt + 1) and time.monotonic() < deadline:
        got.extend(t.version - 1000 for t in source.poll(0.2))
    described = source.describe()["crc32c"]
    source.close()
print("RESULT " + json.dumps({{"native": crc32c_is_native(), "ids": got, "described": described}}))
"""


def consume(kafka_server: KafkaServer, topic: str, n: int, pure: bool) -> tuple[dict[str, object], str]:
    block = "sys.modules['crc32c'] = None  # what a machine without the package sees" if pure else ""
    group = f"crc-{topic}-{'pure' if pure else 'native'}"
    proc = subprocess.run([sys.executable, "-c", CONSUME.format(block=block), kafka_server.bootstrap, topic,
                           group, str(n)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT ")), proc.stdout + proc.stderr


def test_native_crc_is_detected_in_this_environment() -> None:
    # the dev environment installs cdcd[kafka], which brings the C package
    assert crc32c_is_native()


def test_pure_python_crc_is_reported_once_and_records_still_verify(
        make_topic: Callable[..., str], producer: KafkaProducer, kafka_server: KafkaServer) -> None:
    topic = make_topic()
    produce(producer, topic, range(20))
    # the same topic read both ways: a group per way, each reading every record twice (two connects)
    pure, pure_out = consume(kafka_server, topic, 20, pure=True)
    native, native_out = consume(kafka_server, topic, 20, pure=False)
    assert pure["native"] is False and pure["described"] == "pure-python"
    assert native["native"] is True and native["described"] == "native"
    assert pure["ids"] == native["ids"] == list(range(20)) * 2  # nothing was acked: read again after reconnect
    assert pure_out.count("kafka_crc32c_pure_python") == 1, pure_out  # two connects, one warning
    assert "kafka_crc32c_pure_python" not in native_out


def test_describe_reports_the_crc_in_use(make_topic: Callable[..., str], producer: KafkaProducer,
                                         make_source: Callable[..., KafkaSource]) -> None:
    topic = make_topic()
    produce(producer, topic, range(3))
    source = make_source(topics=[topic])
    assert ids(drain(source, 3)) == [0, 1, 2]
    described = source.describe()
    assert described["client"] == source.settings.client
    assert described["crc32c"] == ("native" if source.settings.client == "kafka-python" else "librdkafka")
