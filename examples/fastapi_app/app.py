"""A FastAPI service reading users through cdcd's async client: the README's example, runnable and tested.

- The ``AsyncCache`` lives as long as the app (FastAPI lifespan): its backplane listener runs while the
  app serves, so a commit anywhere drops this process's L1 copy within milliseconds.
- Endpoints get the cache through a dependency (``Depends(get_cache)``), so tests and other apps can
  swap it.
- The loader is a decorated ``async def``: ``user:{user_id}`` is the key the daemon's rule for ``users``
  writes, so the daemon keeps it fresh and a slow request can never write an old row back.

Run it (the daemon must serve the same Redis and keyspace prefix)::

    CDCD_EXAMPLE_DSN=postgresql://... CDCD_EXAMPLE_REDIS=redis://127.0.0.1:6379/0 CDCD_EXAMPLE_PREFIX=v1: \\
        uvicorn --factory examples.fastapi_app.app:create_app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Request
from psycopg.rows import dict_row

from cdcd.client import AsyncCache, CacheOptions, EntryOptions

USER_SQL = "SELECT id, email, name, tenant_id FROM users WHERE id = %s"


def create_app(dsn: str | None = None, redis_url: str | None = None, prefix: str | None = None) -> FastAPI:
    dsn = dsn or os.environ["CDCD_EXAMPLE_DSN"]
    if prefix is None:
        prefix = os.environ.get("CDCD_EXAMPLE_PREFIX", "v1:")
    cache = AsyncCache(redis_url or os.environ.get("CDCD_EXAMPLE_REDIS", "redis://127.0.0.1:6379/0"),
                       CacheOptions(prefix=prefix, entry=EntryOptions(ttl=300, soft_ttl=240)))
    loads = {"n": 0}

    @cache.cached(key="user:{user_id}")
    async def load_user(user_id: int) -> dict[str, Any] | None:
        loads["n"] += 1
        async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
            cur = await conn.execute(USER_SQL, (user_id,))
            return await cur.fetchone()  # None -> a cached "not found" (negative_ttl)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with cache:  # the backplane listener runs while the app does
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.cache = cache
    app.state.loads = loads

    def get_cache(request: Request) -> AsyncCache:
        cache_: AsyncCache = request.app.state.cache
        return cache_

    @app.get("/users/{user_id}")
    async def get_user(user_id: int, cache_: AsyncCache = Depends(get_cache)) -> dict[str, Any]:  # noqa: B008
        user = await load_user(user_id)
        if user is None:
            raise HTTPException(status_code=404, detail="no such user")
        # the daemon's projection (action: update) may carry more columns than the loader selects
        return {"id": int(user["id"]), "email": user["email"], "name": user["name"]}

    @app.get("/stats")
    async def stats(cache_: AsyncCache = Depends(get_cache)) -> dict[str, Any]:  # noqa: B008
        return {"loads": loads["n"], "l1_hits": cache_.stats.l1_hits, "l2_hits": cache_.stats.l2_hits}

    return app
