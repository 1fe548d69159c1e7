"""Fixtures for the client library's tests: real Redis servers from :mod:`cdcd.devservers`, never mocks.

Each test gets its own keyspace prefix (so its channel and keys are its own) on a shared server;
tests that kill, pause or restart Redis get a private one. Nothing here needs Postgres or the
daemon: "daemon-style" writes go through the daemon's own APPLY and BUMP_TAG scripts and its
backplane message format.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from cdcd.client import AsyncCache, Cache, CacheOptions, EntryOptions
from cdcd.devservers import RedisServer
from cdcd.keyspace import Keyspace
from tests.client.support import AsyncDriven, FakeDaemon, LoopThread


@pytest.fixture(scope="session")
def redis_srv(redis_server: RedisServer) -> RedisServer:
    """The suite's shared server (tests/conftest.py), under the name these tests use."""
    return redis_server


@pytest.fixture
def own_redis(private_redis: RedisServer) -> RedisServer:
    """A private server the test may stop, pause and start again (same port)."""
    return private_redis


@pytest.fixture
def rds(redis_srv: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_srv.url)
    yield client
    client.close()


@pytest.fixture
def ks() -> Keyspace:
    return Keyspace(f"t{uuid.uuid4().hex[:10]}:")


@pytest.fixture
def make_cache(redis_srv: RedisServer, ks: Keyspace) -> Iterator[Callable[..., Cache]]:
    """``make_cache(**cache_options, entry=EntryOptions(...))``: caches closed at teardown; jitter 0 by default."""
    made: list[Cache] = []

    def make(url: str | None = None, **kw: Any) -> Cache:
        entry = kw.pop("entry", EntryOptions(jitter=0.0))
        rng = kw.pop("rng", None)
        kw.setdefault("require_registry", False)  # no daemon in these tests
        cache = Cache(url or redis_srv.url, CacheOptions(prefix=ks.prefix, entry=entry, **kw), rng=rng)
        made.append(cache)
        return cache

    yield make
    for c in made:
        c.close()


@pytest.fixture
def make_async_cache(redis_srv: RedisServer, ks: Keyspace) -> Iterator[Callable[..., AsyncDriven]]:
    """``make_cache`` for the asyncio driver: an ``AsyncCache`` on a loop thread, used like a sync ``Cache``
    (see :class:`~tests.client.support.AsyncDriven`)."""
    lt = LoopThread()
    made: list[AsyncDriven] = []

    def make(url: str | None = None, **kw: Any) -> AsyncDriven:
        entry = kw.pop("entry", EntryOptions(jitter=0.0))
        rng = kw.pop("rng", None)
        kw.setdefault("require_registry", False)
        opts = CacheOptions(prefix=ks.prefix, entry=entry, **kw)
        cache = AsyncDriven(lt.run(AsyncCache.create(url or redis_srv.url, opts, rng=rng)), lt.loop)
        made.append(cache)
        return cache

    yield make
    for c in made:
        c.close()
    lt.stop()


@pytest.fixture(params=["sync", "async"])
def make_either(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """The contract and fault tests run against both drivers (``make_cache`` in those modules is this);
    a test that reaches into one driver's internals pins it to "sync" (``support.SYNC_ONLY``)."""
    fn: Callable[..., Any] = request.getfixturevalue("make_cache" if request.param == "sync" else "make_async_cache")
    return fn


@pytest.fixture
def daemon(rds: redis.Redis, ks: Keyspace) -> FakeDaemon:
    return FakeDaemon(rds, ks)
