"""The ``targets:`` section (docs/multi-target.md): what is accepted, and the errors for what is not."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cdcd.config import ConfigError, TargetSettings, load_config, parse_config
from tests.helpers import ROOT


def _base() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "cdcd.example.yaml").read_text())
    del data["redis"]
    return data


def _parse(data: dict[str, Any]) -> Any:
    return parse_config(yaml.safe_dump(data, sort_keys=False), "t.yaml")


def test_single_redis_section_is_one_target_named_redis() -> None:
    config = load_config(ROOT / "config" / "cdcd.example.yaml")
    assert config.targets is None
    assert list(config.target_settings()) == ["redis"]
    assert config.target_settings()["redis"] is config.redis


def test_example_targets_config_loads() -> None:
    config = load_config(ROOT / "config" / "cdcd.targets.example.yaml")
    assert config.targets is not None and len(config.targets) >= 2
    assert all(isinstance(t, TargetSettings) for t in config.targets.values())
    assert list(config.target_settings()) == list(config.targets)  # order kept: the first gets dead letters


def test_targets_take_redis_settings_and_a_backlog_bound() -> None:
    data = _base()
    data["targets"] = {"eu": {"url": "redis://eu:6379/0", "socket_timeout": 2},
                       "us-east_1": {"url": "rediss://us:6380/1", "max_pending_changes": 5000}}
    config = _parse(data)
    assert config.targets["eu"].socket_timeout == 2
    assert config.targets["eu"].max_pending_changes == 100_000
    assert config.targets["us-east_1"].max_pending_changes == 5000


@pytest.mark.parametrize(("targets", "message"), [
    ({}, "no targets"),
    ({"eu west": {"url": "redis://a/0"}}, "is not a target name"),
    ({"": {"url": "redis://a/0"}}, "is not a target name"),
    ({"a": {"url": "redis://x/0"}, "b": {"url": "redis://x/0"}}, "have the same url"),
    ({"a": {"url": "redis://x/0", "max_pending_changes": 0}}, "max_pending_changes"),
    ({"a": {"url": "redis://x/0", "sentinel": True}}, "sentinel"),
])
def test_bad_targets_are_refused_with_the_path(targets: dict[str, Any], message: str) -> None:
    data = _base()
    data["targets"] = targets
    with pytest.raises(ConfigError) as err:
        _parse(data)
    assert "targets" in str(err.value) and message in str(err.value)


def test_redis_and_targets_together_are_refused() -> None:
    data = _base()
    data["redis"] = {"url": "redis://a/0"}
    data["targets"] = {"b": {"url": "redis://b/0"}}
    with pytest.raises(ConfigError, match=r"either redis: .* or targets: .*not both"):
        _parse(data)


def test_a_target_named_twice_is_refused_with_both_lines() -> None:
    text = yaml.safe_dump(_base(), sort_keys=False) + (
        "targets:\n"
        "  eu:\n    url: redis://a/0\n"
        "  eu:\n    url: redis://b/0\n")
    with pytest.raises(ConfigError, match=r"t.yaml:\d+: targets: target 'eu' is named twice \(first at line \d+\)"):
        parse_config(text, "t.yaml")


def test_one_redis_commands_pick_a_target_by_name() -> None:
    single = load_config(ROOT / "config" / "cdcd.example.yaml")
    assert single.redis_for(None) is single.redis
    with pytest.raises(ConfigError, match="no targets: section"):
        single.redis_for("eu-west")
    multi = load_config(ROOT / "config" / "cdcd.targets.example.yaml")
    assert multi.targets is not None
    assert multi.redis_for("us-east") is multi.targets["us-east"]
    with pytest.raises(ConfigError, match=r"several Redis targets \(eu-west, us-east\): name one with --target"):
        multi.redis_for(None)
    with pytest.raises(ConfigError, match="no such target"):
        multi.redis_for("ap")


def test_environment_overrides_reach_a_target_only_by_its_exact_lower_case_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = _base()
    data["targets"] = {"eu": {"url": "redis://eu:6379/0"}, "us-east": {"url": "redis://us:6379/0"}}
    monkeypatch.setenv("CDCD_TARGETS__EU__PASSWORD", "s3cret")
    config = _parse(data)
    assert config.targets["eu"].password.get_secret_value() == "s3cret"
    assert config.targets["eu"].url == "redis://eu:6379/0"  # merged into the file's target, not replacing it
    assert list(config.targets) == ["eu", "us-east"]
    # meant for us-east, but an environment name cannot hold '-': it would add a target at the default Redis
    monkeypatch.setenv("CDCD_TARGETS__US_EAST__PASSWORD", "s3cret")
    with pytest.raises(ConfigError, match="'us_east' come only from the environment"):
        _parse(data)
