"""Environment overrides (docs/configuration.md): ``CDCD_<SECTION>__<FIELD>`` wins over the file."""

from __future__ import annotations

import pytest

from cdcd.config import PostgresSourceSettings, load_config
from tests.helpers import EXAMPLE_RULES


def test_environment_wins_over_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDCD_SOURCE__DSN", "postgresql://cdcd@db.internal/app")
    monkeypatch.setenv("CDCD_REDIS__URL", "redis://cache.internal:6380/2")
    monkeypatch.setenv("CDCD_MONITOR__MAX_RETAINED_WAL", "2GB")
    monkeypatch.setenv("CDCD_DAEMON__HEARTBEAT", "0")
    config = load_config(EXAMPLE_RULES)
    assert isinstance(config.source, PostgresSourceSettings)
    assert config.source.dsn == "postgresql://cdcd@db.internal/app"
    assert config.source.slot == "cdcd"  # the rest of the section still comes from the file
    assert config.redis.url == "redis://cache.internal:6380/2"
    assert config.redis.socket_timeout == 5  # from the file
    assert config.monitor.max_retained_wal == 2 * 1024**3
    assert config.daemon.heartbeat == 0
