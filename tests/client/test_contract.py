"""The client's contract against a real Redis: single flight, the write-back race, the L1 insert race,
backplane propagation between two caches, tags and table tags, XFetch through the cache, cross-process
locks, stale entries keeping their age, counters."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from cdcd.client import NOT_FOUND, Cache, EntryOptions
from cdcd.keyspace import Keyspace
from tests.client.support import SYNC_ONLY, FakeDaemon, fields, wait_for

MakeCache = Callable[..., Cache]


@pytest.fixture
def make_cache(make_either: MakeCache) -> MakeCache:
    """Every test here runs against both drivers (the asyncio one through ``support.AsyncDriven``), but
    those marked ``SYNC_ONLY``: they patch the sync driver's link or module."""
    return make_either


def test_100_threads_on_a_cold_key_call_the_loader_once(make_cache: MakeCache) -> None:
    cache = make_cache(subscribe=False)
    release = threading.Event()
    calls: list[int] = []

    def loader() -> dict[str, int]:
        calls.append(1)
        release.wait(10)
        return {"id": 1}

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load("cold", loader))) for _ in range(100)]
    for t in threads:
        t.start()
    wait_for(lambda: cache.stats.coalesced == 99, what="99 callers waiting on the one load")
    release.set()
    for t in threads:
        t.join(10)
    assert results == [{"id": 1}] * 100
    assert len(calls) == 1 and cache.stats.loader_calls == 1 and cache.stats.coalesced == 99
    assert cache.stats.fills == 1 and cache.get_or_load("cold", lambda: pytest.fail("cached")) == {"id": 1}


def test_write_back_race_the_old_row_lands_nowhere(make_cache: MakeCache, daemon: FakeDaemon, rds: redis.Redis,
                                                   ks: Keyspace) -> None:
    a, b = make_cache(), make_cache()
    token_taken, change_applied = threading.Event(), threading.Event()

    def loader() -> dict[str, str]:
        row = {"status": "new"}  # A reads the row before B's commit...
        token_taken.set()
        change_applied.wait(5)  # ...B commits and the daemon applies it (value + backplane message)...
        return row  # ...and A tries to fill what it read

    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(a.get_or_load("order:1", loader)))
    t.start()
    assert token_taken.wait(5)
    daemon.apply("order:1", b'{"status":"paid"}')
    change_applied.set()
    t.join(5)
    assert out == [{"status": "new"}]  # the caller still gets what it loaded
    assert fields(rds, ks.entry("order:1"))["d"] == '{"status":"paid"}'  # L2 keeps the newer state
    assert "order:1" not in a.l1.data and a.stats.fills_refused == 1  # and A's L1 keeps no copy
    assert a.get_or_load("order:1", lambda: pytest.fail("L2 has it")) == {"status": "paid"}
    assert b.get("order:1") == {"status": "paid"}


@SYNC_ONLY
def test_an_l2_read_overtaken_by_the_backplane_is_not_inserted(make_cache: MakeCache, daemon: FakeDaemon) -> None:
    """The L1 insert race: A reads the old value from L2, the daemon changes the key and its message
    reaches A, and only then would A insert what it read. The insert is refused."""
    a = make_cache()
    daemon.apply("user:1", b'{"v":1}')
    wait_for(lambda: a.stats.backplane_messages == 1)
    read_back, go_on = threading.Event(), threading.Event()
    real_call = a.link.call

    def slow_reads(cmds: Any) -> list[Any]:
        replies = real_call(cmds)
        if cmds[0][0] == "HMGET":
            read_back.set()
            go_on.wait(5)
        return replies

    a.link.call = slow_reads  # type: ignore[method-assign]
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(a.get("user:1")))
    t.start()
    assert read_back.wait(5)
    daemon.apply("user:1", b'{"v":2}')
    wait_for(lambda: a.stats.backplane_messages == 2, what="the change's message reached A")
    go_on.set()
    t.join(5)
    assert out == [{"v": 1}]  # it was current when read...
    assert "user:1" not in a.l1.data and a.stats.l1_put_refused == 1  # ...but must not outlive the change
    a.link.call = real_call  # type: ignore[method-assign]
    assert a.get("user:1") == {"v": 2}


def test_a_change_drops_the_other_process_l1_through_the_backplane(make_cache: MakeCache, daemon: FakeDaemon) -> None:
    a, b = make_cache(), make_cache()
    loads: list[str] = []
    assert b.get_or_load("user:7", lambda: loads.append("b") or {"name": "old"}) == {"name": "old"}
    assert a.get_or_load("user:7", lambda: loads.append("a") or {"name": "?"}) == {"name": "old"}  # L2 hit
    assert "user:7" in a.l1.data and "user:7" in b.l1.data and loads == ["b"]
    daemon.apply("user:7", b'{"name":"new"}')  # what the daemon does for an update rule
    took = max(wait_for(lambda: "user:7" not in a.l1.data, timeout=2),
               wait_for(lambda: "user:7" not in b.l1.data, timeout=2))
    # the entries live 300 s: only the backplane can drop them this soon. The latency itself (a few ms) is
    # measured by bench/e2e_latency.py; the bound here leaves room for a busy machine.
    assert took < 1.0, f"L1 copies dropped after {took * 1000:.1f} ms"
    assert a.get_or_load("user:7", lambda: pytest.fail("L2 has it")) == {"name": "new"}
    # an application's own set/delete propagate the same way
    a.set("user:7", {"name": "set by a"})
    assert a.get("user:7") == {"name": "set by a"}  # this process: at once, no round trip
    wait_for(lambda: b.get("user:7") == {"name": "set by a"}, timeout=1, what="set propagated")
    a.delete("user:7")
    wait_for(lambda: "user:7" not in b.l1.data, timeout=1, what="delete propagated")
    assert b.get("user:7") is None and a.stats.published == 2 and b.stats.published == 0


def test_invalidate_tag_misses_here_and_in_the_other_l1(make_cache: MakeCache) -> None:
    a, b = make_cache(), make_cache()
    for c in (a, b):
        assert c.get_or_load("report:7", lambda: "r1", tags=["tenant:7"]) == "r1"
        c.get_or_load("report:8", lambda: "other", tags=["tenant:8"])
    assert b.stats.l2_hits == 2
    assert a.invalidate_tag("tenant:7") is True
    assert "report:7" not in a.l1.data and "report:8" in a.l1.data  # O(1) in L2, by index in L1
    assert a.get_or_load("report:7", lambda: "r2", tags=["tenant:7"]) == "r2"
    wait_for(lambda: "report:7" not in b.l1.data, timeout=1, what="B's L1 dropped via the backplane")
    assert "report:8" in b.l1.data
    assert b.get_or_load("report:7", lambda: pytest.fail("A refilled it"), tags=["tenant:7"]) == "r2"


def test_truncate_bumps_the_table_tag_every_matching_entry_recorded(make_cache: MakeCache, daemon: FakeDaemon,
                                                                    rds: redis.Redis, ks: Keyspace) -> None:
    rds.set(ks.registry, json.dumps({"tables": {"public.users": {"keys": ["user:{id}", "user:email:{email}"],
                                                                 "tags": ["tenant:{tenant_id}"]}}}))
    table = Keyspace.table_tag("public.users")
    a, b = make_cache(), make_cache()
    assert a.get_or_load("user:1", lambda: {"id": 1}) == {"id": 1}
    assert a.get_or_load("dash:3", lambda: "d3", tags=["tenant:3"]) == "d3"
    a.get_or_load("config", lambda: "c")  # derives from no table
    assert set(json.loads(fields(rds, ks.entry("user:1"))["t"])) == {table}
    assert set(json.loads(fields(rds, ks.entry("dash:3"))["t"])) == {"tenant:3", table}
    epoch = rds.get(ks.tag(table))
    assert epoch is not None
    daemon.apply("user:2", b'{"id":2}', tagsnap=json.dumps({table: epoch.decode()}))  # a daemon-written value
    assert b.get("user:2") == {"id": 2} and b.get("user:1") == {"id": 1}
    daemon.bump(table)  # TRUNCATE users: one counter bump and one message
    for c in (a, b):
        wait_for(lambda c=c: not ({"user:1", "user:2", "dash:3"} & set(c.l1.data)), timeout=1,
                 what="table tag dropped L1 entries")
    assert "config" in a.l1.data
    assert b.get("user:2") is None and b.get("user:1") is None  # L2 entries miss: their counter moved
    assert a.get_or_load("user:1", lambda: {"id": 1, "after": "truncate"}) == {"id": 1, "after": "truncate"}


@SYNC_ONLY
def test_xfetch_rate_through_the_cache_matches_the_expected_probability(make_cache: MakeCache,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    beta, n = 1.0, 20_000
    cache = make_cache(subscribe=False, rng=random.Random(42),
                       entry=EntryOptions(ttl=60, jitter=0.0, early_refresh_beta=beta))
    cache.get_or_load("hot", lambda: time.sleep(0.1) or "v")  # a load that takes ~100 ms
    e = cache.l1.data["hot"]
    delta = e.delta
    assert 0.1 <= delta < 0.5 and e.early == e.soft - 20 * delta * beta  # the hit path skips draws before this
    release = threading.Event()

    def refresh() -> str:
        release.wait(5)  # keep the refresh in flight so the entry stays the same during the draws
        return "v2"

    for remaining in (0.3, 0.1, 0.02):
        monkeypatch.setattr("cdcd.client.cache.monotonic", lambda r=remaining: e.soft - r)
        before = cache.stats.early_refreshes
        for _ in range(n):
            assert cache.get_or_load("hot", refresh) == "v"
        rate = (cache.stats.early_refreshes - before) / n
        p = math.exp(-remaining / (delta * beta))
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (remaining, rate, p)
    assert cache.stats.refreshes == 1 and cache.stats.loader_calls == 2  # one refresh, however many draws
    monkeypatch.undo()
    release.set()
    wait_for(lambda: cache.get("hot") == "v2", what="the early refresh landed")
    assert cache.stats.loader_calls == 2


def test_an_entry_read_from_l2_keeps_its_age(make_cache: MakeCache) -> None:
    """Stale-while-revalidate across processes: B reads an entry A loaded long ago; it is stale in B too."""
    opts = EntryOptions(ttl=2.0, soft_ttl=0.3, jitter=0.0, early_refresh_beta=0)
    a, b = make_cache(entry=opts), make_cache(entry=opts)
    a.get_or_load("k", lambda: "v1")
    time.sleep(0.4)
    calls: list[int] = []

    def reload() -> str:
        calls.append(1)
        time.sleep(1.0)  # a slow database: the stale value must not wait for it
        return "v2"

    t0 = time.monotonic()
    assert b.get_or_load("k", reload) == "v1"  # served at once...
    assert time.monotonic() - t0 < 0.5  # ...without waiting for the 1 s reload (slack for a busy machine)
    wait_for(lambda: b.get("k") == "v2", what="...and refreshed once in the background")
    assert calls == [1] and b.stats.refreshes == 1


@SYNC_ONLY
def test_cross_process_lock_one_load_and_a_dead_holder_blocks_at_most_its_ttl(make_cache: MakeCache,
                                                                              rds: redis.Redis,
                                                                              ks: Keyspace) -> None:
    # lock_ttl is generous so a busy machine cannot expire A's lock while B is still starting
    opts = EntryOptions(jitter=0.0, distributed_lock=True, lock_ttl=2.0)
    a, b = make_cache(entry=opts, subscribe=False), make_cache(entry=opts, subscribe=False)
    started, release, b_waits = threading.Event(), threading.Event(), threading.Event()
    calls: list[str] = []
    real_call_checked = b.link.call_checked

    def spy(cmds: Any) -> list[Any]:
        out = real_call_checked(cmds)
        if cmds and cmds[0][0] == "SET" and "NX" in cmds[0] and not out[0]:
            b_waits.set()  # B tried to take the lock and found A holding it: B is now waiting
        return out

    b.link.call_checked = spy  # type: ignore[method-assign]

    def slow(who: str) -> Callable[[], str]:
        def load() -> str:
            calls.append(who)
            started.set()
            release.wait(5)
            return f"from {who}"
        return load

    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(a.get_or_load("shared", slow("a"))))
    t.start()
    assert started.wait(5)
    tb = threading.Thread(target=lambda: out.append(b.get_or_load("shared", slow("b"))))
    tb.start()
    assert b_waits.wait(5)
    release.set()
    t.join(5)
    tb.join(5)
    assert calls == ["a"] and out == ["from a", "from a"] and b.stats.coalesced == 1
    # a holder that died: its lock blocks the others only until it expires
    rds.set(f"{ks.prefix}#cdcd:lock:orphan", "dead-process", px=300)
    t0 = time.monotonic()
    assert b.get_or_load("orphan", lambda: "loaded") == "loaded"
    # waited for the orphan's 0.3 s, not for its own lock_ttl (2 s); the slack is for a busy machine
    assert 0.2 < time.monotonic() - t0 < 0.3 + 1.0


@SYNC_ONLY
def test_negative_entries_and_decorators(make_cache: MakeCache, rds: redis.Redis, ks: Keyspace) -> None:
    cache = make_cache(subscribe=False)
    assert cache.get_or_load("user:404", lambda: NOT_FOUND) is None
    assert fields(rds, ks.entry("user:404"))["n"] == "1" and cache.stats.negative_fills == 1
    assert cache.get("user:404", "absent") == "absent"
    calls: list[int] = []

    @cache.cached(key="user:{user_id}", tags=["tenant:{tenant}"], ttl=60)
    def get_user(user_id: int, tenant: int = 3) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id, "tenant": tenant}

    assert get_user(5) == get_user(5) == {"id": 5, "tenant": 3} and calls == [5]
    assert get_user.key(5) == "user:5"  # type: ignore[attr-defined]
    assert get_user.invalidate(5) is True  # type: ignore[attr-defined]
    assert get_user(5) == {"id": 5, "tenant": 3} and calls == [5, 5]
    with pytest.raises(TypeError, match="AsyncCache"):
        @cache.cached(key="x")
        async def nope() -> None: ...


@SYNC_ONLY
def test_set_refused_by_the_guard_keeps_no_l1_copy(make_cache: MakeCache, daemon: FakeDaemon) -> None:
    cache = make_cache(subscribe=False)
    real_call = cache.link.call

    def change_after_token(cmds: Any) -> list[Any]:
        replies = real_call(cmds)
        if cmds[0][0] == "EVALSHA" and len(cmds) >= 2 and cmds[1][0] == "PTTL":
            daemon.apply("user:9", b'{"by":"daemon"}', publish=False)  # lands between token and fill
        return replies

    cache.link.call = change_after_token  # type: ignore[method-assign]
    assert cache.set("user:9", {"by": "app"}) is False
    assert "user:9" not in cache.l1.data and cache.stats.fills_refused == 1
    cache.link.call = real_call  # type: ignore[method-assign]
    assert cache.get("user:9") == {"by": "daemon"}


def test_counters_by_tier_and_prometheus(make_cache: MakeCache) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    cache = make_cache(subscribe=False)
    cache.get_or_load("k", lambda: 1)
    cache.get_or_load("k", lambda: 1)
    tiers = cache.stats.by_tier()
    assert tiers["l1"]["hit"] == 1 and tiers["l1"]["miss"] == 1 and tiers["l2"]["miss"] == 1
    assert tiers["loader"]["call"] == 1 and tiers["l2"]["fill"] == 1
    reg = CollectorRegistry()
    cache.stats.register_prometheus(reg)
    text = generate_latest(reg).decode()
    assert 'cdcd_client_events_total{event="hit",tier="l1"} 1.0' in text
