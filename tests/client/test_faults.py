"""Failure is the normal case: loader errors and timeouts, Redis killed, Redis frozen, backplane gaps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from cdcd.bloom import params_id
from cdcd.client import Cache, EntryOptions
from cdcd.devservers import RedisServer
from cdcd.keyspace import Keyspace
from tests.client.support import FakeDaemon, fields, wait_for

MakeCache = Callable[..., Cache]


@pytest.fixture
def make_cache(make_either: MakeCache) -> MakeCache:
    """Every test here runs against both drivers (the asyncio one through ``support.AsyncDriven``), but
    those marked ``SYNC_ONLY``: they patch the sync driver's link or module."""
    return make_either


def broken() -> str:
    raise RuntimeError("database down")


def test_failing_loader_serves_stale_within_max_age_then_the_error(make_cache: MakeCache) -> None:
    opts = EntryOptions(ttl=0.2, jitter=0.0, fail_safe_max_age=0.5, fail_safe_throttle=0.2, early_refresh_beta=0)
    cache = make_cache(subscribe=False, entry=opts)
    assert cache.get_or_load("k", lambda: "good") == "good"
    time.sleep(0.25)  # expired in L1 and L2
    assert cache.get_or_load("k", broken) == "good"  # fail-safe
    assert cache.stats.fail_safe == 1 and cache.stats.loader_errors == 1
    assert cache.get_or_load("k", broken) == "good"  # throttled: the failing loader is not called again at once
    assert cache.stats.loader_errors == 1
    time.sleep(0.25)
    assert cache.get_or_load("k", broken) == "good" and cache.stats.loader_errors == 2  # retried, still failing
    time.sleep(0.35)  # now past the fail-safe window
    with pytest.raises(RuntimeError, match="database down"):
        cache.get_or_load("k", broken)
    assert cache.get_or_load("k", lambda: "back") == "back"  # errors are never cached


def test_soft_timeout_serves_stale_and_the_slow_load_still_fills(make_cache: MakeCache, rds: redis.Redis) -> None:
    opts = EntryOptions(ttl=0.2, jitter=0.0, loader_soft_timeout=0.05, loader_hard_timeout=2.0,
                        early_refresh_beta=0)
    cache = make_cache(subscribe=False, entry=opts)
    cache.get_or_load("k", lambda: "old")
    time.sleep(0.25)
    t0 = time.monotonic()
    assert cache.get_or_load("k", lambda: time.sleep(1.5) or "new") == "old"
    # the soft timeout (0.05 s) answered, not the 1.5 s loader; the slack is for a busy machine
    assert time.monotonic() - t0 < 1.0 and cache.stats.loader_timeouts == 1
    wait_for(lambda: cache.get("k") == "new", what="the slow loader finished and filled")
    # without a fallback, the hard timeout raises (and the load still completes in the background)
    with pytest.raises(TimeoutError):
        cache.get_or_load("cold", lambda: time.sleep(0.3) or "late", options=opts.merged(loader_hard_timeout=0.05))
    wait_for(lambda: cache.get("cold") == "late", what="the late load filled L2 and L1")


def test_redis_killed_l1_serves_calls_stay_bounded_breaker_closes_after_restart(own_redis: RedisServer,
                                                                                 make_cache: MakeCache) -> None:
    opts = EntryOptions(ttl=0.3, jitter=0.0, early_refresh_beta=0, fail_safe_throttle=0.0)
    cache = make_cache(own_redis.url, entry=opts, redis_timeout=0.2, breaker_failures=2, breaker_reset=0.3,
                       backplane_ping=0.2)
    assert cache.wait_subscribed()
    cache.get_or_load("hot", lambda: "v")
    cache.get_or_load("cooling", lambda: "c")
    own_redis.stop()
    loads: list[str] = []
    durations: list[float] = []

    def timed(fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            durations.append(time.monotonic() - t0)

    assert timed(lambda: cache.get_or_load("hot", lambda: loads.append("hot") or "x")) == "v"  # fresh in L1
    time.sleep(0.35)  # both entries expire; Redis is gone
    assert timed(lambda: cache.get_or_load("cooling", lambda: loads.append("cooling") or "x")) == "c"  # fail-safe
    for i in range(4):  # nothing in L1: the loader answers without L2
        assert timed(lambda i=i: cache.get_or_load(f"miss{i}", lambda: loads.append("miss") or "loaded")) == "loaded"
    assert timed(lambda: cache.get("cooling")) == "c"
    # never more than one socket timeout (0.2 s), with slack for a busy machine: redis-py's default
    # retries (with backoff) would cost seconds
    assert max(durations) < 0.2 + 0.8, durations
    assert loads == ["miss"] * 4 and cache.stats.fail_safe >= 2
    assert cache.breaker.state in ("open", "half-open") and cache.stats.breaker_open >= 1
    assert cache.set("w", 1) is False and cache.delete("w") is False  # writes report that Redis did not take them
    resets = cache.stats.l1_resets
    own_redis.start()  # same port
    wait_for(lambda: cache.get_or_load(f"probe{time.monotonic()}", lambda: "ok") == "ok"
             and cache.breaker.state == "closed", timeout=5, what="breaker closed again")
    wait_for(lambda: cache.stats.backplane_reconnects >= 1 and cache.stats.l1_resets > resets, timeout=5,
             what="the listener re-subscribed and reset L1")
    assert cache.get_or_load("hot", lambda: "reloaded") == "reloaded"  # Redis lost everything: loaded again


def test_frozen_redis_costs_one_timeout_per_call_then_nothing(own_redis: RedisServer, make_cache: MakeCache) -> None:
    """SIGSTOP: the port accepts, nothing answers (a partition). redis-py's default retries would turn each
    call into seconds; the cache's connections do not retry, and the breaker stops the calls."""
    cache = make_cache(own_redis.url, redis_timeout=0.15, breaker_failures=2, breaker_reset=5.0,
                       backplane_ping=0.1, entry=EntryOptions(jitter=0.0))
    assert cache.wait_subscribed()
    cache.get_or_load("k", lambda: "v")
    own_redis.pause()
    try:
        t0 = time.monotonic()
        assert cache.get_or_load("a", lambda: "A") == "A"  # times out on Redis once, then loads
        first = time.monotonic() - t0
        cache.get_or_load("b", lambda: "B")  # second failure opens the breaker
        t0 = time.monotonic()
        for i in range(20):
            cache.get_or_load(f"c{i}", lambda: "C")
        after = time.monotonic() - t0
        assert first < 0.15 * 2 + 0.5, first  # one or two timeouts, not redis-py's retries (seconds)
        assert after < 1.0, after  # breaker open: no Redis call at all (20 timeouts would be 3 s)
        assert cache.get_or_load("k", lambda: "unused") == "v"
        wait_for(lambda: not cache.wait_subscribed(0), timeout=2, what="the listener noticed the silence")
    finally:
        own_redis.resume()


def test_backplane_gap_and_new_daemon_run_reset_l1(make_cache: MakeCache, daemon: FakeDaemon) -> None:
    cache = make_cache()
    daemon.publish(keys=[])  # the daemon's first message we hear: a baseline, no reset
    wait_for(lambda: cache.stats.backplane_messages == 1)
    cache.get_or_load("a", lambda: 1)
    cache.get_or_load("b", lambda: 2)
    resets = cache.stats.l1_resets
    daemon.publish(keys=["a"])  # in sequence: drops only a
    wait_for(lambda: "a" not in cache.l1.data, what="a dropped")
    assert cache.l1.data["b"].hard > time.monotonic() and cache.stats.l1_resets == resets
    daemon.seq.seq += 1  # one message lost...
    daemon.publish(keys=[])  # ...so this one shows a gap
    wait_for(lambda: cache.stats.backplane_gaps == 1, what="gap detected")
    assert cache.stats.l1_resets == resets + 1 and cache.l1.data["b"].hard == 0.0  # expired (kept as fallback)
    calls: list[int] = []
    assert cache.get_or_load("b", lambda: calls.append(1) or 2) == 2 and calls == []  # re-read from L2
    daemon.publish(keys=[], run="restarted-daemon", seq=1)  # a new daemon run
    wait_for(lambda: cache.stats.l1_resets == resets + 2, what="new run detected")
    assert cache.l1.data["b"].hard == 0.0
    # an application's first message is not a gap, and this process ignores its own messages
    other = make_cache()
    other.sequencer.seq = 41
    other.delete("zzz")
    cache.delete("yyy")
    wait_for(lambda: cache.stats.backplane_messages == 5, what="the other app's message")
    time.sleep(0.05)
    assert cache.stats.backplane_messages == 5 and cache.stats.l1_resets == resets + 2


def test_negative_entry_does_not_hide_an_insert(make_cache: MakeCache, daemon: FakeDaemon, rds: redis.Redis) -> None:
    cache = make_cache()
    gate = threading.Event()

    def not_found() -> None:
        gate.wait(5)
        return None

    t = threading.Thread(target=lambda: cache.get_or_load("user:3", not_found))
    t.start()
    wait_for(lambda: rds.exists(daemon.ks.entry("user:3")), what="lease taken")
    daemon.apply("user:3", b'{"id":3}')  # the row is inserted while the "not found" is in flight
    gate.set()
    t.join(5)
    assert fields(rds, daemon.ks.entry("user:3"))["d"] == '{"id":3}' and cache.stats.fills_refused == 1
    assert cache.get_or_load("user:3", lambda: pytest.fail("L2 has the row")) == {"id": 3}


def test_existence_filter_is_a_step_of_the_miss_flow_and_every_doubt_is_maybe(make_cache: MakeCache, rds: redis.Redis,
                                                                                ks: Keyspace) -> None:
    """One implementation for both drivers (the core's miss flow): "absent" answers None with no loader call
    and nothing cached; an unseeded filter, a filter key someone broke, and a filter for other keys all
    answer "maybe" (the loader runs); a key the filter does not hold is a clear error."""
    cache = make_cache(subscribe=False)
    loads: list[str] = []

    def loader(k: str) -> Callable[[], dict[str, str]]:
        return lambda: loads.append(k) or {"k": k}

    # not seeded: maybe
    assert cache.get_or_load("user:1", loader("user:1"), exists_filter="users") == {"k": "user:1"}
    meta, b0, _ = ks.exists_filter("users")
    m = 1024
    rds.setbit(b0, m - 1, 0)  # an empty generation: every key of the template is definitely absent
    rds.hset(meta, mapping={"a": "0", "ap": params_id(m, 3, "user:{id}")})
    assert cache.get_or_load("user:2", loader("user:2"), exists_filter="users") is None
    assert cache.stats.exists_absent == 1 and loads == ["user:1"]
    assert rds.exists(ks.entry("user:2")) == 0 and cache.get("user:2") is None  # nothing cached, no lease taken
    with pytest.raises(ValueError, match="not a key of the existence filter"):
        cache.get_or_load("order:2", loader("order:2"), exists_filter="users")
    rds.delete(b0)
    rds.set(meta, "not a hash")  # someone wrote over it: WRONGTYPE is a doubt, not an error
    assert cache.get_or_load("user:3", loader("user:3"), exists_filter="users") == {"k": "user:3"}
    assert cache.stats.exists_absent == 1 and loads == ["user:1", "user:3"]


def test_existence_filter_with_redis_down_answers_maybe(make_cache: MakeCache, own_redis: RedisServer) -> None:
    cache = make_cache(own_redis.url, subscribe=False, redis_timeout=0.2, breaker_failures=1, breaker_reset=30.0)
    own_redis.stop()
    assert cache.get_or_load("user:9", lambda: {"id": 9}, exists_filter="users") == {"id": 9}
    assert cache.stats.exists_absent == 0
