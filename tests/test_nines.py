"""The nines arithmetic of ``cdcd inspect --watch`` (pure: no servers)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from cdcd.inspect.nines import NinesCounter, StaleRead, format_bound, nines, render
from cdcd.inspect.watchmetrics import WatchMetrics


def stale(s: float | None, key: str = "k") -> StaleRead:
    return StaleRead(key, s, "value differs", "in_flight")


def test_nines_definition_and_cap() -> None:
    assert nines(0, 0) == (None, False)
    v, capped = nines(999, 1000)
    assert not capped and v == pytest.approx(3.0)
    v, capped = nines(9, 10)
    assert not capped and v == pytest.approx(1.0)
    assert nines(0, 10) == (0.0, False)  # all inconsistent: zero nines
    v, capped = nines(1000, 1000)  # none inconsistent: only ">= log10(samples)" is known
    assert capped and v == pytest.approx(3.0)
    v, capped = nines(1, 1)
    assert capped and v == 0.0


def test_stale_reads_count_against_the_bounds_they_exceed() -> None:
    c = NinesCounter((0.01, 0.1, 1.0))
    c.record_consistent(996)
    c.record_stale(stale(0.004))  # within every bound
    c.record_stale(stale(0.05))  # beyond 10 ms
    c.record_stale(stale(0.5))  # beyond 100 ms
    c.record_stale(stale(30.0))  # beyond 1 s
    assert c.reads == 1000 and c.stale == 4
    assert [c.stale_beyond(b) for b in c.bounds] == [3, 2, 1]
    at = {n.bound: n for n in c.all()}
    assert at[0.01].consistent == 997 and at[0.01].value == pytest.approx(-math.log10(3 / 1000))
    assert at[1.0].consistent == 999 and at[1.0].value == pytest.approx(3.0) and not at[1.0].capped
    assert c.max_staleness == 30.0
    # histogram: one in each of the buckets <=5ms, <=50ms, <=500ms, <=30s
    assert sum(c.histogram) == 4 and c.histogram[1] == 1


def test_exactly_on_the_bound_is_within_and_negative_is_zero() -> None:
    c = NinesCounter((0.1,))
    c.record_stale(stale(0.1))
    c.record_stale(stale(-0.002))  # clock noise: never "more consistent than fresh"
    assert c.stale_beyond(0.1) == 0
    assert c.at(0.1).capped  # both within: no inconsistency at this bound
    assert c.max_staleness == 0.1


def test_unknown_staleness_counts_against_every_bound() -> None:
    c = NinesCounter((0.01, 1.0))
    c.record_consistent(9)
    c.record_stale(stale(None))
    assert c.unknown_staleness == 1
    assert [c.stale_beyond(b) for b in c.bounds] == [1, 1]
    assert c.at(1.0).value == pytest.approx(1.0)


def test_misses_unverifiable_unsettled_are_not_reads() -> None:
    c = NinesCounter()
    c.record_miss(5)
    c.record_unverifiable(2)
    c.record_unsettled(1)
    assert c.reads == 0 and c.at(1.0).value is None and c.at(1.0).text() == "n/a"
    assert not c.at(1.0).below(None)  # no reads: nothing to fail on (the verdict is "inconclusive" elsewhere)


def test_below_threshold() -> None:
    c = NinesCounter((1.0,))
    c.record_consistent(99)
    c.record_stale(stale(5.0))
    n = c.at(1.0)
    assert n.value == pytest.approx(2.0)
    assert n.below(None)  # default: any stale read beyond the bound fails
    assert n.below(2.5) and not n.below(2.0) and not n.below(1.5)
    ok = NinesCounter((1.0,))
    ok.record_consistent(10)
    assert not ok.at(1.0).below(None) and not ok.at(1.0).below(6)  # capped: a lower bound never fails


def test_bounds_validated_and_sorted() -> None:
    assert NinesCounter((1.0, 0.01, 1.0)).bounds == (0.01, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        NinesCounter((-1.0,))
    with pytest.raises(ValueError):
        NinesCounter(())
    with pytest.raises(KeyError):
        NinesCounter((1.0,)).at(0.5)


def test_format_and_render() -> None:
    assert [format_bound(b) for b in (0.01, 0.1, 1.0, 2.5, 0.0005)] == ["10ms", "100ms", "1s", "2.5s", "0.0005s"]
    c = NinesCounter((0.01, 1.0))
    c.record_consistent(98)
    c.record_stale(stale(0.2, "v1:user:7"))
    c.record_stale(stale(None, "v1:order:3"))
    text = render(c, 12.0)
    assert "100 reads" in text and "STALE READ v1:user:7: stale for 0.200s" in text
    assert "stale for unknown" in text
    d = c.to_dict()
    assert d["reads"] == 100 and d["bounds"][1]["stale_beyond"] == 1 and d["staleness_histogram"]["0.25"] == 1
    assert len(c.recent) == 2


def test_recent_stale_reads_are_bounded() -> None:
    c = NinesCounter()
    for i in range(1000):
        c.record_stale(stale(1.0, f"k{i}"))
    assert len(c.recent) == 20 and c.recent[-1].key == "k999"


def test_metrics_follow_the_counter() -> None:
    c = NinesCounter((0.01, 1.0))
    m = WatchMetrics()
    c.record_consistent(99)
    c.record_miss(3)
    c.record_stale(stale(0.5))
    m.update(c, [0.5])
    c.record_consistent(1)
    m.update(c, [])
    text = generate_latest(m.registry).decode()
    assert 'cdcd_watch_reads_total{outcome="consistent"} 100.0' in text
    assert 'cdcd_watch_reads_total{outcome="stale"} 1.0' in text
    assert 'cdcd_watch_reads_total{outcome="miss"} 3.0' in text
    assert 'cdcd_watch_stale_beyond{bound="10ms"} 1.0' in text
    assert 'cdcd_watch_stale_beyond{bound="1s"} 0.0' in text
    assert 'cdcd_watch_nines_capped{bound="1s"} 1.0' in text
    assert 'cdcd_watch_staleness_seconds_count 1.0' in text
    nines_10ms = next(line for line in text.splitlines() if line.startswith('cdcd_watch_nines{bound="10ms"}'))
    assert float(nines_10ms.split()[-1]) == pytest.approx(-math.log10(1 / 101))
