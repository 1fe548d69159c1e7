"""The hot-key sketch and its sampling, as pure logic: accuracy on a Zipf stream, bounded memory."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from cdcd.client.hotkeys import HotKeys, sampling_gaps
from cdcd.client.options import HotKeyOptions
from cdcd.client.sketch import TopK
from cdcd.hotset import publish_commands
from cdcd.keyspace import Keyspace


def zipf_stream(n: int, keys: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (i ** s) for i in range(1, keys + 1)]
    return [f"user:{i}" for i in rng.choices(range(1, keys + 1), weights=weights, k=n)]


def test_zipf_top_keys_found_with_the_misra_gries_bound() -> None:
    stream = zipf_stream(200_000, 50_000, 1.1, seed=7)
    truth = Counter(stream)
    sk = TopK(256)
    for k in stream:
        sk.offer(k)
    assert sk.total == len(stream)
    assert sk.rounds <= len(stream) / 257  # the bound on every estimate's error
    for k, est in sk.counts.items():
        assert est <= truth[k] <= est + sk.rounds, k
    # every key heavier than total/(capacity+1) is tracked
    heavy = [k for k, c in truth.items() if c > len(stream) / 257]
    assert heavy and all(k in sk.counts for k in heavy)
    # the reported top 20 are the true top 20 (the head of a Zipf stream is well separated)
    true_top = [k for k, _ in truth.most_common(20)]
    got = [k for k, _ in sk.top(20)]
    assert len(set(got) & set(true_top)) >= 19, (got, true_top)
    assert got[:5] == true_top[:5]


def test_memory_is_bounded_by_capacity_whatever_the_stream() -> None:
    sk = TopK(100)
    for i in range(300_000):  # all distinct: the worst case for a counting table
        sk.offer(f"k{i}")
        assert len(sk) <= 100
    assert len(sk) <= 100 and sk.total == 300_000
    with pytest.raises(ValueError):
        TopK(0)


def test_sampling_gaps_have_the_requested_mean() -> None:
    gaps = sampling_gaps(8, random.Random(1), n=20_000)
    assert 7.6 < statistics.fmean(gaps) < 8.4 and min(gaps) >= 1
    assert sampling_gaps(1, random.Random(1)) == (1,)


class _FakeCache:
    """Only what ``HotKeys.attach`` touches: the methods it wraps and the names it reads."""

    def __init__(self) -> None:
        self.keyspace = Keyspace("p:")
        self.run_id = "run1"
        self.rng = random.Random(3)
        self.calls: list[tuple[str, object]] = []

    def get(self, key: str, default: object = None) -> object:
        self.calls.append((key, default))
        return default

    def get_or_load(self, key: str, loader: object, **kw: object) -> object:
        self.calls.append((key, loader))
        return kw


def test_attach_samples_reads_passes_arguments_through_and_scales_scores() -> None:
    c = _FakeCache()
    hot = HotKeys.attach(c, HotKeyOptions(sample=4, top=3, publish=False))
    assert hot is not None and HotKeys.attach(c, None) is None
    for i in range(40_000):
        c.get("a" if i % 2 else "b", default=i)
    assert c.calls[-1] == ("a", 39_999)
    assert c.get_or_load("a", "L", ttl=5) == {"ttl": 5}
    c.get("x" * 10_000)  # longer than max_key_length: never counted
    c.get("p#cdcd:hot")  # cdcd's own namespace: never counted
    top = dict(hot.sketch.top(10))
    assert set(top) <= {"a", "b"} and 8_000 < top["a"] + top["b"] < 12_000  # ~1 in 4 of 40k reads
    published = dict(hot.rotate())
    assert set(published) == {"a", "b"} and all(s > 0 for s in published.values())
    assert len(hot.sketch) == 0  # a fresh window
    faded = dict(hot.rotate())  # an idle window: the keys fade (half), they do not vanish
    assert faded == {k: round(s / 2, 3) for k, s in published.items()}
    for _ in range(60):
        hot.rotate()
    assert hot.last_window == []  # and are gone once their score is negligible


def test_publish_commands_replace_the_process_set_atomically() -> None:
    cmds = publish_commands(Keyspace("p:"), "r1", [("user:1", 10.0), ("user:2", 2.5)], now=1000.0, ttl_s=30)
    assert cmds[0] == ("MULTI",) and ("EXEC",) in cmds
    assert ("DEL", "p:#cdcd:hot:r1") in cmds
    assert ("ZADD", "p:#cdcd:hot:r1", "10.0", "user:1", "2.5", "user:2") in cmds
    assert ("ZADD", "p:#cdcd:hot", "1000.0", "r1") in cmds


def test_prometheus_export_of_the_last_window() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    c = _FakeCache()
    hot = HotKeys.attach(c, HotKeyOptions(sample=1, top=2, publish=False))
    assert hot is not None
    for key in ["a"] * 5 + ["b"] * 3 + ["c"]:
        c.get(key)
    hot.rotate()
    reg = CollectorRegistry()
    hot.register_prometheus(reg)
    text = generate_latest(reg).decode()
    assert 'cdcd_client_hot_key_reads_per_second{key="a"}' in text
    assert 'key="b"' in text and 'key="c"' not in text  # only the top 2: bounded label values
    assert "cdcd_client_hot_keys_publish_errors_total 0.0" in text
