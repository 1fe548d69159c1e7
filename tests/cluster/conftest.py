"""A real Redis Cluster (3 masters, 3 replicas) for the tests in this folder, started once per session.

Started only when a test here asks for it. Tests that kill a master or move slots leave the cluster with
3 serving masters and every slot covered (they restart what they killed and wait for ``cluster_state:ok``),
so later tests see a healthy cluster; the node layout may differ, which no test depends on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster

from cdcd.devservers import RedisClusterServer
from tests.helpers import config_dict, unique


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    server = RedisClusterServer(masters=3, replicas=1)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def rc(redis_cluster: RedisClusterServer) -> Iterator[RedisCluster]:
    redis_cluster.wait_ok()
    client = RedisCluster.from_url(redis_cluster.url, socket_timeout=2, socket_connect_timeout=1)
    yield client
    client.close()


@pytest.fixture
def ccfg(app_db: str, redis_cluster: RedisClusterServer) -> dict[str, Any]:
    """The example rules against the cluster: seeds, cluster on, sharded backplane."""
    data = config_dict(app_db, redis_cluster.url, unique("s"), unique("p") + ":")
    data["redis"].update({"cluster": True, "urls": redis_cluster.urls[1:3]})
    return data
