"""A Redis Cluster client that connects on first use, so a cluster that is down does not stop a start.

``redis.cluster.RedisCluster`` reads the slot map in its constructor and raises when no seed answers,
where ``redis.Redis`` connects on the first command. The daemon builds its client before it runs and
retries Redis faults with backoff only once it runs: an eager cluster client would turn "Redis down at
start" into a crash (and a crash loop under a supervisor). This wrapper builds the client on the first
attribute access instead, retrying on every access until it succeeds; a failure raises redis-py's
``RedisClusterException``, which the daemon and the cache treat as a Redis fault (retried, or the breaker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LazyRedisCluster:
    """Stands for the ``redis.cluster.RedisCluster`` that ``factory()`` builds, built on first use."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._client: Any = None
        self._lock = threading.Lock()

    def resolve(self) -> Any:
        """The client, built now if it was not yet (raises what the constructor raises)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._factory()
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolve(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
