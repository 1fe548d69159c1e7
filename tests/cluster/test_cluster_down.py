"""A cluster that cannot be reached when the daemon or the cache starts is a Redis fault (retried, or the
breaker and the loader), never a crash: the cluster client connects on first use (cdcd.lazycluster)."""

from __future__ import annotations

import time

import pytest

from cdcd.client import Cache, CacheOptions
from cdcd.config import ConfigError, parse_config
from cdcd.devservers import free_port
from tests.helpers import DaemonThread, config_dict, make_config, unique, wait_until


def test_daemon_starts_and_retries_while_the_cluster_is_down(app_db: str) -> None:
    data = config_dict(app_db, f"redis://127.0.0.1:{free_port()}/0", unique("s"), unique("p") + ":")
    data["redis"]["cluster"] = True
    d = DaemonThread(make_config(data)).start(wait=False)  # constructing it did not raise
    try:
        wait_until(lambda: d.daemon.metrics.retries.labels("redis")._value.get() >= 2, what="retried with backoff")
        assert d.error is None and d.thread.is_alive() and not d.daemon.ready.is_set()
        assert "Redis Cluster cannot be connected" in (d.daemon.last_error or "")
    finally:
        d.stop()


def test_cache_on_an_unreachable_cluster_url_degrades_to_the_loader() -> None:
    cache = Cache(f"redis+cluster://127.0.0.1:{free_port()}", CacheOptions(prefix="x:", subscribe=False,
                                                                          redis_timeout=0.2))
    try:
        t0 = time.monotonic()
        assert cache.get_or_load("k", lambda: {"v": 1}) == {"v": 1}  # L2 unavailable: the loader's value
        assert cache.stats.redis_errors >= 1 and time.monotonic() - t0 < 10
    finally:
        cache.close()


def test_cluster_settings_are_checked_at_load() -> None:
    base = config_dict("postgresql://x/y", "redis://127.0.0.1:7000/0", "s", "p:")
    bad_db = {**base, "redis": {"url": "redis://127.0.0.1:7000/2", "cluster": True}}
    with pytest.raises(ConfigError, match="database 0"):
        make_config(bad_db)
    seeds_alone = {**base, "redis": {"url": "redis://127.0.0.1:7000/0", "urls": ["redis://127.0.0.1:7001"]}}
    with pytest.raises(ConfigError, match="cluster: true"):
        make_config(seeds_alone)
    ok = parse_config("source: {dsn: 'postgresql://x/y'}\nredis: {cluster: true, url: 'redis://a:1', "
                      "urls: ['redis://b:2'], pubsub: classic, wait_replicas: 1}\ntables: {t: {keys: ['t:{id}']}}\n")
    assert ok.redis.cluster and ok.redis.urls == ["redis://b:2"] and ok.redis.pubsub == "classic"
