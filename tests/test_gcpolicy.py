"""``cdcd run``'s garbage-collector policy: set as documented, and cyclic garbage is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cdcd import gcpolicy


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_policy_freezes_startup_and_raises_the_young_threshold(restored: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    gcpolicy.tune_for_daemon()
    assert gc.get_threshold() == (gcpolicy.GEN0, gen1, gen2)
    assert gc.get_freeze_count() > 0
    assert gc.isenabled()


def test_cycles_are_still_collected_within_the_threshold(restored: None) -> None:
    """Memory stays bounded: a reference cycle (what an exception's traceback makes) dies once the young
    generation fills, without anyone calling gc.collect()."""
    gcpolicy.tune_for_daemon()
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    del a, b
    assert alive() is not None  # only the collector can free a cycle
    keep = [[] for _ in range(gcpolicy.GEN0 * 3)]  # container allocations, as the hot path makes them
    assert alive() is None
    del keep
