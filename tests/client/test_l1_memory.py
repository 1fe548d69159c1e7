"""``l1_max_bytes`` bounds real memory (issue 15, item 7): counted bytes track RSS growth within 1.5x.

Each measurement runs bench/l1_memory.py in a fresh interpreter (RSS of this process carries
whatever earlier tests allocated): an L1 filled the way the client fills it, RSS from
/proc/self/statm before and after. Pure L1 level: no Redis, no daemon.
"""

from __future__ import annotations

import pytest

from bench.l1_memory import run_child

pytestmark = pytest.mark.slow  # minutes: each case fills an L1 in a fresh interpreter


@pytest.mark.parametrize("shape", ["row", "short-str", "int-list", "orders-20", "big-list-800", "not-found"])
def test_counted_bytes_track_rss_growth(shape: str) -> None:
    r = run_child(shape)
    assert r["rss_growth"] > 16 << 20, r  # enough growth that page granularity and noise do not matter
    assert 0.67 <= r["ratio"] <= 1.5, r


@pytest.mark.parametrize("shape", ["row", "orders-20"])
def test_the_byte_bound_holds_under_eviction(shape: str) -> None:
    bound = 24 << 20
    r = run_child(shape, bound, scale=4)
    assert r["counted"] <= bound
    assert r["rss_growth"] <= 1.5 * bound, r
