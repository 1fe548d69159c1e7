"""The FastAPI example (examples/fastapi_app) against real Postgres, Redis and the daemon (issue 10 item 4)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from cdcd.devservers import RedisServer
from examples.fastapi_app.app import create_app
from tests.helpers import DaemonThread, make_config, wait_until


def test_fastapi_example_serves_cached_users_and_follows_commits(
        cfg: dict[str, Any], redis_server: RedisServer, app_db: str, sql: Any) -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'Ada', 1)")
    d = DaemonThread(make_config(cfg)).start()
    app = create_app(app_db, redis_server.url, cfg["keyspace"]["prefix"])
    try:
        with TestClient(app) as client:  # runs the lifespan: the cache and its backplane listener
            first = client.get("/users/1")
            assert first.status_code == 200 and first.json() == {"id": 1, "email": "a@x", "name": "Ada"}
            assert client.get("/users/1").json()["name"] == "Ada"
            loads = client.get("/stats").json()["loads"]
            assert loads <= 1, "the second request is served from the cache"
            # a commit anywhere: the daemon writes the new projection, the backplane drops this L1 copy
            sql("UPDATE users SET name = 'Grace' WHERE id = 1")
            wait_until(lambda: client.get("/users/1").json()["name"] == "Grace", timeout=10,
                       what="the endpoint serving the committed name")
            assert client.get("/stats").json()["loads"] == loads, "refreshed by the daemon, not by a reload"
            # "not found" is cached too, and a later insert replaces it
            assert client.get("/users/2").status_code == 404
            sql("INSERT INTO users (id, email, name, tenant_id) VALUES (2, 'b@x', 'Bob', 1)")
            wait_until(lambda: client.get("/users/2").status_code == 200, timeout=10,
                       what="the new user served after its insert")
            assert client.get("/users/2").json()["name"] == "Bob"
    finally:
        d.stop()
