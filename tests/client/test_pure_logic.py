"""Pure logic, no I/O: L1 fencing and eviction, sequence tracking, XFetch, lifetimes, key templates, breaker."""

from __future__ import annotations

import math
import random
import time

import pytest

from cdcd.backplane import Message
from cdcd.client.breaker import CircuitBreaker
from cdcd.client.l1 import L1, L1Entry, sized
from cdcd.client.options import EntryOptions
from cdcd.client.protocol import KeyTemplate, Registry, all_tags, make_entry, xfetch_due
from cdcd.client.sizing import slot_bytes
from cdcd.client.stats import Stats
from cdcd.client.subscriber import SeqTracker


def entry(value: object = 1, tags: tuple[str, ...] = (), size: int = 10, ttl: float = 60.0) -> L1Entry:
    now = time.monotonic()
    return L1Entry(value, now + ttl, now + ttl, now + 2 * ttl, tags, size, False, 0.0)


def test_l1_refuses_an_insert_overtaken_by_an_invalidation() -> None:
    l1 = L1(100, 1 << 20, Stats())
    since = l1.begin()  # a reader starts reading L2...
    l1.remove("user:1")  # ...the backplane drops the key meanwhile...
    assert l1.put("user:1", entry("old"), since) is False  # ...so what it read must not land
    assert "user:1" not in l1.data and l1.stats.l1_put_refused == 1
    assert l1.put("user:1", entry("new"), l1.begin()) is True  # a read begun after the drop is fine
    # a tag drop fences entries carrying the tag, not the others
    since = l1.begin()
    l1.remove_tags(["tenant:7"])
    assert l1.put("a", entry(tags=("tenant:7",)), since) is False
    assert l1.put("b", entry(tags=("tenant:8",)), since) is True
    # a reset fences everything begun before it, and keeps entries as expired fallbacks
    since = l1.begin()
    l1.expire_all()
    assert l1.put("c", entry(), since) is False
    assert l1.data["b"].hard == 0.0 and l1.data["b"].keep > time.monotonic()


def test_l1_fence_for_own_writes_and_trimmed_drop_log(monkeypatch: pytest.MonkeyPatch) -> None:
    l1 = L1(100, 1 << 20, Stats())
    reader = l1.begin()  # a local read of the old value is in flight
    writer = l1.begin()
    assert l1.put("k", entry("written"), writer, fence=True)  # this process's own set()
    assert l1.put("k", entry("read before the write"), reader) is False
    assert l1.data["k"].value == "written"
    # a bounded drop log: once trimmed, every insert begun before the trim is refused (the safe side)
    monkeypatch.setattr("cdcd.client.l1.DROP_LOG_MAX", 3)
    since = l1.begin()
    l1.remove_many(["x1", "x2", "x3", "x4"])
    l1.remove("x5")
    assert l1.put("unrelated", entry(), since) is False
    assert l1.put("unrelated", entry(), l1.begin()) is True


def test_l1_bounds_evict_second_chance_and_keep_the_tag_index_exact() -> None:
    l1 = L1(3, 1 << 20, Stats())
    for k in "abc":
        l1.put(k, entry(k, tags=("t",)))
    l1.data["a"].ref = True  # "a" was read: it survives the next eviction, "b" (oldest unread) goes
    l1.put("d", entry("d", tags=("t",)))
    assert list(l1.data) == ["c", "d", "a"] and l1.stats.l1_evictions == 1  # "a" moved to the young end
    assert l1.by_tag["t"] == {"a", "c", "d"}
    # bytes: entries counted by size plus their slot (key, dict node); a big one pushes out the oldest
    each = 300 + slot_bytes("k0", 0)
    b = L1(100, 3 * each + 10, Stats())
    for i in range(5):
        b.put(f"k{i}", entry(size=300))
    assert b.bytes == 3 * each and len(b) == 3 and "k4" in b.data
    assert b.remove_tags(["nope"]) == 0
    b.remove("k4")
    assert b.bytes == 2 * each
    # entries past their fail-safe window are purged
    assert b.purge_dead(time.monotonic() + 1000) == 2 and len(b) == 0 and b.bytes == 0


def test_seq_tracker_gaps_runs_repeats_and_own_messages() -> None:
    t = SeqTracker(own_run="me")
    t.subscribed()

    def m(origin: str, run: str, seq: int) -> Message:
        return Message(origin, run, seq)

    assert t.check(m("cdcd", "d1", 57)) is None  # first daemon run after subscribing: a baseline
    assert t.check(m("cdcd", "d1", 58)) is None
    assert t.check(m("cdcd", "d1", 58)) is None  # a repeated publish: nothing was lost
    assert (t.check(m("cdcd", "d1", 60)) or "").startswith("gap")
    assert t.check(m("app", "a1", 9)) is None  # first message of a new app run: not a gap
    assert t.check(m("app", "a1", 10)) is None
    assert (t.check(m("app", "a1", 12)) or "").startswith("gap")
    assert (t.check(m("cdcd", "d2", 1)) or "").startswith("new daemon run")  # a restarted daemon
    assert t.check(m("app", "me", 99)) is None  # our own
    t.subscribed()  # after a re-subscription (which resets L1) the next daemon run is a baseline again
    assert t.check(m("cdcd", "d3", 5)) is None


def test_xfetch_rate_matches_exp_minus_remaining_over_delta_beta() -> None:
    rng = random.Random(20240611)
    for delta, beta, remaining in ((0.1, 1.0, 0.05), (0.1, 1.0, 0.2), (0.05, 2.0, 0.1), (0.2, 0.5, 0.3)):
        n = 40_000
        got = sum(xfetch_due(delta, beta, remaining, 1.0 - rng.random()) for _ in range(n)) / n
        want = math.exp(-remaining / (delta * beta))
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n) + 1e-3, (delta, beta, remaining, got, want)


def test_entry_lifetimes_keep_the_l2_age_and_open_the_xfetch_window() -> None:
    rng = random.Random(1)
    opts = EntryOptions(ttl=100, soft_ttl=60, jitter=0.0, fail_safe_max_age=10)
    now = 1000.0
    fresh = make_entry(now, "v", False, opts, 100.0, ("t",), 5, 0.0, "g1", rng)
    assert (fresh.soft, fresh.hard, fresh.keep) == (now + 60, now + 100, now + 110)
    assert fresh.size == sized("v", ("t",), "g1", 5) and fresh.early == fresh.soft  # no load time: no XFetch
    old = make_entry(now, "v", False, opts, 30.0, (), 5, 0.0, "g1", rng)  # written 70 s ago by someone else
    assert old.soft == now - 10 and old.hard == now + 30  # already stale: served while one refresh runs
    capped = make_entry(now, "v", False, EntryOptions(ttl=100, l1_ttl=5, jitter=0.0), 100.0, (), 5, 0.0, None, rng)
    assert capped.hard == now + 5  # L1 re-reads L2 after l1_ttl
    loaded = make_entry(now, "v", False, EntryOptions(ttl=100, jitter=0.0, early_refresh_beta=1.0), 100.0, (),
                        5, 0.5, None, rng)
    assert loaded.early == now + 100 - 20 * 0.5  # the hit path draws only inside the XFetch window
    neg = make_entry(now, None, True, EntryOptions(ttl=100, negative_ttl=7, jitter=0.0), 3.0, (), 0, 0.0, None, rng)
    assert neg.hard == now + 3  # a "not found" never outlives what L2 holds


def test_registry_implies_table_tags_and_key_templates() -> None:
    reg = Registry()
    reg.load('{"tables": {"public.users": {"keys": ["user:{id}", "user:email:{email}"], "tags": ["tenant:{t}"]},'
             ' "public.orders": {"keys": ["order:{id}"], "tags": []}}}')
    assert all_tags("user:42", [], reg) == ["#table:public.users"]
    assert all_tags("dash:7", ["tenant:7"], reg) == ["tenant:7", "#table:public.users"]
    assert all_tags("order:1", ["x"], reg) == ["x", "#table:public.orders"]
    assert all_tags("other", [], reg) == []

    def fn(user_id: int, tenant: int = 3, *, flag: bool = False) -> None: ...

    tpl = KeyTemplate(fn, "user:{user_id}", ["tenant:{tenant}"])
    assert tpl.render((5,), {}) == ("user:5", ["tenant:3"])
    assert tpl.render((5,), {"tenant": 9}) == ("user:5", ["tenant:9"])

    def simple(a: int, b: int) -> None: ...

    assert KeyTemplate(simple, "{a}:-{b}", []).render((1, 2), {}) == ("1:-2", [])
    with pytest.raises(ValueError, match="must contain ':'"):
        KeyTemplate(simple, "{a}-{b}", [])  # ambiguous: refused as the daemon refuses it


def test_breaker_opens_probes_once_and_forgets_a_lost_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("cdcd.client.breaker.time.monotonic", lambda: now[0])
    b = CircuitBreaker(failures=2, reset=1.0)
    assert b.allow() and not b.failure() and b.failure()  # the second failure opens it
    assert b.state == "open" and not b.allow()
    now[0] += 1.1
    assert b.state == "half-open" and b.allow() and not b.allow()  # one probe at a time
    now[0] += 1.1  # the probe never reported (its caller was cancelled): another one may go
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
