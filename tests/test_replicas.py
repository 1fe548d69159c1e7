"""Hot-key replicas end to end (docs/hot-keys.md): real Postgres, Redis and daemon, both client drivers.

The rules replicate ``user:{id}`` (update rule) 4 times and ``order:{id}`` (invalidate rule) 3 times. The
daemon writes every copy with the primary's version; a client with ``read_replicas`` reads a random copy and
its mirror counters; a copy older than what the process has seen is never served; tag bumps, TRUNCATE and
the client's own tag invalidation reach every copy.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from cdcd.client import AsyncCache, Cache, CacheOptions
from cdcd.config import ConfigError
from cdcd.keyspace import SCRIPTS, Keyspace, replica_slots
from tests.helpers import DaemonThread, entry, make_config, wait_until

USERS, ORDERS = replica_slots(4), replica_slots(3)


def _cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["tables"]["users"]["replicas"] = 4
    cfg["tables"]["orders"]["replicas"] = 3
    return cfg


class Driver:
    """The sync ``Cache`` or the ``AsyncCache`` (on a loop of its own) behind one blocking interface."""

    def __init__(self, kind: str, url: str, opts: CacheOptions) -> None:
        self.kind = kind
        if kind == "sync":
            self.cache: Any = Cache(url, opts, rng=random.Random(7))
        else:
            self.loop = asyncio.new_event_loop()
            self.cache = self.loop.run_until_complete(AsyncCache.create(url, opts, rng=random.Random(7)))

    def __call__(self, name: str, *args: Any, **kw: Any) -> Any:
        got = getattr(self.cache, name)(*args, **kw)
        return self.loop.run_until_complete(got) if self.kind == "async" else got

    def close(self) -> None:
        if self.kind == "sync":
            self.cache.close()
        else:
            self.loop.run_until_complete(self.cache.close())
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def client(request: pytest.FixtureRequest, cfg: dict[str, Any]) -> Iterator[Callable[..., Driver]]:
    made: list[Driver] = []

    def make(**kw: Any) -> Driver:
        opts = CacheOptions(prefix=cfg["keyspace"]["prefix"], subscribe=False, l1_max_entries=0,
                            read_replicas=True, **kw)
        d = Driver(request.param, cfg["redis"]["url"], opts)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _copies(r: redis.Redis, ks: Keyspace, key: str, slots: tuple[int, ...]) -> list[dict[str, str]]:
    return [entry(r, ks.replica(key, s)) for s in slots]


def test_bad_replicas_is_a_precise_config_error(cfg: dict[str, Any]) -> None:
    for bad, says in ((0, "replicas must be from 1 to 16"), (17, "not 17"), ("4x", "whole number"),
                      (True, "whole number")):
        cfg["tables"]["users"]["replicas"] = bad
        with pytest.raises(ConfigError) as err:
            make_config(cfg)
        assert "users" in str(err.value) and "replicas" in str(err.value) and says in str(err.value), str(err.value)
    cfg["tables"]["users"]["replicas"] = 4
    cfg["keyspace"]["prefix"] = "{v1}:"
    with pytest.raises(ConfigError, match="prefix without"):
        make_config(cfg)


def test_every_copy_written_and_invalidated_with_the_same_version(cfg: dict[str, Any], r: redis.Redis,
                                                                   sql: Any) -> None:
    d = DaemonThread(make_config(_cfg(cfg))).start()
    ks = Keyspace(cfg["keyspace"]["prefix"])
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'ann', 7)")
        sql("INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (1, 1, 7, 10, 'new')")
        sql("UPDATE users SET name = 'bea' WHERE id = 1")
        wait_until(lambda: all('"bea"' in c.get("d", "") for c in _copies(r, ks, "user:1", USERS)),
                   what="every copy holds the update")
        prim = entry(r, ks.entry("user:1"))
        copies = _copies(r, ks, "user:1", USERS)
        assert {c["v"] for c in copies} == {prim["v"]} and {c["d"] for c in copies} == {prim["d"]}
        for slot, c in zip(USERS, copies, strict=True):  # each copy records its own slot's mirror counter
            mirror = r.get(ks.mirror("#table:public.users", slot))
            assert mirror is not None and json.loads(c["t"]) == {"#table:public.users": mirror.decode()}
        orders = _copies(r, ks, "order:1", ORDERS)  # invalidate rule: tombstones, same version
        assert {c["v"] for c in orders} == {entry(r, ks.entry("order:1"))["v"]} and not any("d" in c for c in orders)
        sql("DELETE FROM users WHERE id = 1")
        wait_until(lambda: all("d" not in c for c in _copies(r, ks, "user:1", USERS)), what="copies dropped")
        assert {c["v"] for c in _copies(r, ks, "user:1", USERS)} == {entry(r, ks.entry("user:1"))["v"]}
    finally:
        d.stop()


def test_stale_write_back_to_any_copy_is_refused(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    d = DaemonThread(make_config(_cfg(cfg))).start()
    ks = Keyspace(cfg["keyspace"]["prefix"])
    read, fill = SCRIPTS["read"], SCRIPTS["fill"]
    try:
        tokens = {}
        for slot in ORDERS:  # a reader of each copy takes its fill token, then queries the database...
            tokens[slot] = r.evalsha(read.sha, 1, ks.replica("order:5", slot), 10_000, "1")[1]
        sql("INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (5, 1, 7, 10, 'new')")
        wait_until(lambda: all(c.get("s") == "cdc" for c in _copies(r, ks, "order:5", ORDERS)), what="tombstones")
        for slot in ORDERS:  # ... and writes back what it read before the insert: refused on every copy
            assert r.evalsha(fill.sha, 1, ks.replica("order:5", slot), tokens[slot], 60_000, b"stale", "1", "") == 0
        assert all("n" not in c and "d" not in c for c in _copies(r, ks, "order:5", ORDERS))
    finally:
        d.stop()


def test_a_process_never_goes_back_to_an_older_copy(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                    client: Callable[..., Driver]) -> None:
    d = DaemonThread(make_config(_cfg(cfg))).start()
    ks = Keyspace(cfg["keyspace"]["prefix"])
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (2, 'b@x', 'old', 7)")
        wait_until(lambda: all('"old"' in c.get("d", "") for c in _copies(r, ks, "user:2", USERS)), what="v1")
        behind = _copies(r, ks, "user:2", USERS)[1]  # what copy 1 holds now: kept to plant it back later
        sql("UPDATE users SET name = 'new' WHERE id = 2")
        wait_until(lambda: all('"new"' in c.get("d", "") for c in _copies(r, ks, "user:2", USERS)), what="v2")
        c = client()
        loads: list[str] = []

        def loader() -> dict[str, Any]:
            loads.append("x")
            return {"id": 2, "name": "new"}

        wait_until(lambda: c("get", "user:2") is not None, what="the client found the registry")
        for _ in range(20):  # every copy seen at v2
            assert c("get_or_load", "user:2", loader)["name"] == "new"
        assert loads == []
        # Copy 1 falls behind (as between two copies' writes of one change): the old value, with a snapshot
        # that is still valid, so only the version tells it apart.
        plant = {"v": behind["v"], "d": behind["d"], "t": behind["t"]}
        r.hset(ks.replica("user:2", USERS[1]), mapping=plant)
        got = [c("get", "user:2") for _ in range(30)]  # get: a behind copy is a miss (None), never the old row
        assert None in got and all(v is None or v["name"] == "new" for v in got)
        assert c.cache.stats.replica_behind > 0
        r.hset(ks.replica("user:2", USERS[1]), mapping=plant)
        names = [c("get_or_load", "user:2", loader)["name"] for _ in range(40)]
        assert names == ["new"] * 40 and loads  # the behind copy was a miss: loaded and refilled
        # the refill of the behind copy claimed the seen version: the daemon's late write at it is harmless
        assert int(entry(r, ks.replica("user:2", USERS[1]))["v"]) >= int(entry(r, ks.entry("user:2"))["v"])
    finally:
        d.stop()


def test_truncate_and_tag_invalidation_reach_every_copy(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                        client: Callable[..., Driver]) -> None:
    d = DaemonThread(make_config(_cfg(cfg))).start()
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (3, 'c@x', 'cat', 7)")
        ks = Keyspace(cfg["keyspace"]["prefix"])
        wait_until(lambda: all('"cat"' in c.get("d", "") for c in _copies(r, ks, "user:3", USERS)), what="copies")
        c = client()
        wait_until(lambda: c("get", "user:3") is not None, what="the client found the registry")
        assert all(c("get", "user:3") is not None for _ in range(30))  # every copy is a hit
        sql("TRUNCATE users")
        wait_until(lambda: c("get", "user:3") is None, what="the truncate")
        assert [c("get", "user:3") for _ in range(40)] == [None] * 40  # every copy misses

        # the client's own tag invalidation: app-filled copies under tag t1 are never served after it
        value = ["v1"]
        for _ in range(40):
            assert c("get_or_load", "order:9", lambda: value[0], tags=["t1"]) == "v1"
        filled = [e for e in _copies(r, ks, "order:9", ORDERS) if e.get("s") == "app"]
        assert len(filled) == 3  # every copy got filled by its own misses
        value[0] = "v2"
        assert c("invalidate_tag", "t1")
        assert [c("get_or_load", "order:9", lambda: value[0], tags=["t1"]) for _ in range(40)] == ["v2"] * 40
        # and a copy's recorded snapshot no longer matches its mirror (bumped with the tag)
        for slot in ORDERS:
            e = entry(r, ks.replica("order:9", slot))
            assert json.loads(e["t"])["t1"] == r.get(ks.mirror("t1", slot)).decode()  # refilled after the bump
        c("delete", "order:9")  # delete reaches every copy
        assert all("d" not in e for e in _copies(r, ks, "order:9", ORDERS))
    finally:
        d.stop()


def test_a_degraded_transaction_reaches_every_copy(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                    client: Callable[..., Driver]) -> None:
    """A transaction past the cap is not kept row by row: its table counts as truncated, on every copy too."""
    cfg["source"]["max_transaction_changes"] = 20
    d = DaemonThread(make_config(_cfg(cfg))).start()
    try:
        ks = Keyspace(cfg["keyspace"]["prefix"])
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (4, 'd@x', 'dan', 7)")
        wait_until(lambda: all('"dan"' in c.get("d", "") for c in _copies(r, ks, "user:4", USERS)), what="copies")
        c = client()
        wait_until(lambda: c("get", "user:4") is not None, what="the client found the registry")
        assert all(c("get", "user:4") is not None for _ in range(30))
        # 50 rows in one transaction, none of them user 4: only the degraded path can reach its copies
        sql("INSERT INTO users (id, email, name, tenant_id) SELECT g, 'g' || g || '@x', 'g', 1 "
            "FROM generate_series(100, 149) g")
        wait_until(lambda: d.daemon.metrics.degraded_transactions._value.get() == 1, what="degraded")
        wait_until(lambda: c("get", "user:4") is None, what="the degraded transaction")
        assert [c("get", "user:4") for _ in range(40)] == [None] * 40
    finally:
        d.stop()


def test_a_fill_claims_only_the_version_seen_before_its_load(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                             client: Callable[..., Driver]) -> None:
    """Another thread may see a newer version while this one loads: the fill must not claim that one (its value
    may predate it, and the daemon's write at that version would then be refused, leaving the copy stale)."""
    d = DaemonThread(make_config(_cfg(cfg))).start()
    try:
        ks = Keyspace(cfg["keyspace"]["prefix"])
        sql("INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (7, 1, 7, 10, 'new')")
        wait_until(lambda: all(e.get("s") == "cdc" for e in _copies(r, ks, "order:7", ORDERS)), what="tombstones")
        version = int(entry(r, ks.entry("order:7"))["v"])
        c = client()
        newer = version + 10**9

        def loader() -> str:
            c.cache.core.seen["order:7"] = newer  # what a concurrent reader of another copy would record
            return "loaded"

        assert c("get_or_load", "order:7", loader) == "loaded"
        filled = [e for e in _copies(r, ks, "order:7", ORDERS) if e.get("s") == "app"]
        assert len(filled) == 1 and int(filled[0]["v"]) == version  # the version seen at its own read
    finally:
        d.stop()


@pytest.mark.parametrize("how", ["warm", "warm --hot"])
def test_warm_fills_every_copy_at_the_snapshot_version(cfg: dict[str, Any], r: redis.Redis, sql: Any,
                                                        client: Callable[..., Driver], how: str) -> None:
    """After a flush, ``cdcd warm`` (and ``--hot``) fill the copies too, each under its own slot's mirror,
    so a process reading copies finds the hot key warm: no loader call."""
    import time

    from cdcd.hotset import publish_commands
    from cdcd.warm import warm
    from cdcd.warm_hot import warm_hot

    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'ann', 7), (2, 'b@x', 'bob', 7)")
    config = make_config(_cfg(cfg))
    d = DaemonThread(config).start()  # slot made now: the inserts above are not streamed
    ks = Keyspace(cfg["keyspace"]["prefix"])
    try:
        if how == "warm":
            report = warm(config, rate=0)
            # 2 rows x 2 keys (user:{id}, user:email:{email}) x (the entry + 4 copies)
            assert {t.table: t.written for t in report.tables}["public.users"] == 2 * 2 * (1 + 4)
        else:
            for cmd in publish_commands(ks, "run1", [("user:1", 50.0)], time.time(), 60):
                r.execute_command(*cmd)
            hot = warm_hot(config, rate=0)
            assert hot.written == 1 + 4
            assert entry(r, ks.entry("user:2")) == {}  # not hot: not warmed
        prim = entry(r, ks.entry("user:1"))
        assert '"ann"' in prim["d"]
        for slot, c in zip(USERS, _copies(r, ks, "user:1", USERS), strict=True):
            assert (c["v"], c["d"]) == (prim["v"], prim["d"])
            mirror = r.get(ks.mirror("#table:public.users", slot))
            assert mirror is not None and json.loads(c["t"]) == {"#table:public.users": mirror.decode()}
        c = client()
        loads = []
        for _ in range(20):  # random copies: every one answers from Redis, none calls the loader
            assert c("get_or_load", "user:1", lambda: loads.append(1) or {"name": "db"})["name"] == "ann"
        assert loads == []
    finally:
        d.stop()


def test_explain_lists_the_copies_the_daemon_writes(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    from cdcd.explain import explain

    config = make_config(_cfg(cfg))
    d = DaemonThread(config).start()
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (3, 'c@x', 'cy', 7)")
        shown = explain(config.rules(), "users", json.dumps({"id": 3, "email": "c@x", "tenant_id": 7}), None)
        assert len(shown.copies) == 2 * 4 and shown.as_dict()["copies"] == shown.copies
        wait_until(lambda: all(entry(r, k).get("d") for k in shown.copies), what="every listed copy written")
        assert {entry(r, k)["v"] for k in shown.copies} == {entry(r, k)["v"] for k in shown.keys}
    finally:
        d.stop()
