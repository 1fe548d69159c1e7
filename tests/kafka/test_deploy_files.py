"""The Debezium deployment files parse and carry the settings cdcd relies on (no Docker engine here to run them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from cdcd.sources.kafka import KafkaSourceSettings

ROOT = Path(__file__).resolve().parents[2]


def connector() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "connectors" / "debezium-postgres.json").read_text())
    return data


def test_connector_registration_has_what_cdcd_needs() -> None:
    data = connector()
    assert set(data) == {"name", "config"}  # the body of POST /connectors
    cfg = data["config"]
    assert all(isinstance(v, str) for v in cfg.values())  # Kafka Connect wants strings
    needed = {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "skipped.operations": "none",  # the default skips truncates
        "publication.autocreate.mode": "filtered",
        "decimal.handling.mode": "precise",  # 12.50 stays 12.50 (double would render 12.5)
        "time.precision.mode": "adaptive",  # microseconds kept (connect would truncate to ms)
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "true",
        "value.converter.schemas.enable": "true",  # types of temporals and decimals travel with the record
        "provide.transaction.metadata": "false",
        "unavailable.value.placeholder": "__debezium_unavailable_value",
    }
    assert {k: cfg.get(k) for k in needed} == needed
    assert "transforms" not in cfg  # no ExtractNewRecordState: cdcd needs before/after/source/op


def test_compose_wires_postgres_kafka_connect_redis_and_cdcd() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "kafka", "connect", "register-connector", "redis", "cdcd"}
    assert "wal_level=logical" in services["postgres"]["command"]
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"] and "ZOOKEEPER" not in json.dumps(kafka_env).upper()
    register = services["register-connector"]
    assert any("debezium-postgres.json" in v for v in register["volumes"])
    assert "http://connect:8083/connectors" in " ".join(register["command"])
    cdcd = services["cdcd"]
    assert cdcd["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert cdcd["command"] == ["run", "--config", "/etc/cdcd/cdcd.yaml"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["cdcd"]' in dockerfile and 'CMD ["run", "--config", "/etc/cdcd/cdcd.yaml"]' in dockerfile
    assert any(v.endswith(":/etc/cdcd/cdcd.yaml:ro") and "cdcd.kafka.example.yaml" in v for v in cdcd["volumes"])
    assert cdcd["depends_on"]["register-connector"]["condition"] == "service_completed_successfully"


def test_example_config_source_section_matches_the_connector() -> None:
    data = yaml.safe_load((ROOT / "config" / "cdcd.kafka.example.yaml").read_text())
    settings = KafkaSourceSettings.model_validate(data["source"])
    prefix = connector()["config"]["topic.prefix"]
    assert settings.type == "kafka" and settings.topic_pattern is not None
    pattern = re.compile(settings.topic_pattern)
    assert pattern.search(f"{prefix}.public.users") and pattern.search(f"{prefix}.message")
    assert not pattern.search(f"__debezium-heartbeat.{prefix}")  # heartbeats are not change topics
    tables = {f"public.{t}" if "." not in t else t for t in data["tables"]}
    assert tables == set(connector()["config"]["table.include.list"].split(","))


def test_example_config_rules_are_valid() -> None:
    """Everything but the source section goes through the daemon's own loader."""
    from cdcd.config import ConfigError, parse_config

    text = (ROOT / "config" / "cdcd.kafka.example.yaml").read_text()
    try:
        config = parse_config(text, "cdcd.kafka.example.yaml")
    except ConfigError as exc:
        if "source" not in str(exc):
            raise
        # the loader does not know source type kafka yet: check the rest with a placeholder source
        data = yaml.safe_load(text)
        data["source"] = {"type": "postgres", "dsn": "postgresql://unused/app"}
        config = parse_config(yaml.safe_dump(data), "cdcd.kafka.example.yaml")
    assert set(config.rules().by_relation) == {"public.users", "public.orders"}
