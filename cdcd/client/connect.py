"""Which link a cache gets, and what a URL opens: ``redis+cluster://`` is a Redis Cluster, anything else one node.

Kept apart from the links themselves (:mod:`.link`, :mod:`.cluster_link`) so the caches import one small
factory, whatever Redis they talk to.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cdcd.lazycluster import LazyRedisCluster

from .breaker import CircuitBreaker
from .cluster_link import AsyncClusterLink, ClusterLink
from .link import AsyncLink, Link
from .options import CacheOptions
from .stats import Stats

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The plain ``redis://`` seed URL of a ``redis+cluster://`` (or ``rediss+cluster://``) URL, else None."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme)
    return urlunsplit(parts._replace(scheme=plain)) if plain else None


def is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, (RedisCluster, AsyncRedisCluster, LazyRedisCluster))


def open_client(client: Any) -> Any:
    """A URL becomes a client: ``redis+cluster://`` a ``redis.cluster.RedisCluster``, else a ``redis.Redis``."""
    import redis

    if not isinstance(client, str):
        return client
    seed = cluster_url(client)
    if seed is not None:
        from redis.cluster import RedisCluster

        return LazyRedisCluster(lambda: RedisCluster.from_url(seed))  # connects on first use, as redis.Redis does
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(client))


def open_async_client(client: Any) -> Any:
    import redis.asyncio as aredis

    if not isinstance(client, str):
        return client
    seed = cluster_url(client)
    if seed is not None:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(seed)
    return aredis.Redis(connection_pool=aredis.ConnectionPool.from_url(client))


def make_link(client: Any, opts: CacheOptions, breaker: CircuitBreaker, stats: Stats) -> Link | ClusterLink:
    """The link for an application's client: its pool settings on a single node, its nodes on a cluster."""
    if is_cluster(client):
        return ClusterLink(client, opts.redis_timeout, opts.connect_timeout_s, breaker, stats, opts.cluster_pubsub)
    return Link(client.connection_pool, opts.redis_timeout, opts.connect_timeout_s, breaker, stats)


def make_async_link(client: Any, opts: CacheOptions, breaker: CircuitBreaker,
                    stats: Stats) -> AsyncLink | AsyncClusterLink:
    if is_cluster(client):
        return AsyncClusterLink(client, opts.redis_timeout, opts.connect_timeout_s, breaker, stats,
                                opts.cluster_pubsub)
    return AsyncLink(client.connection_pool, opts.redis_timeout, opts.connect_timeout_s, breaker, stats)
