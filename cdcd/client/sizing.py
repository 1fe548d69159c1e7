"""Honest byte estimates for L1 entries, so ``l1_max_bytes`` bounds real memory.

An L1 entry costs far more than its serialized value: the deserialized value is
a graph of Python objects (a 90-byte JSON object becomes a dict of ~10 objects,
~1 KB), and around it sit the entry object, its float times, the tags tuple and
strings, the key string, the OrderedDict slot and node, and a slot in each tag's
index set. Counting ``len(serialized) + 200`` undercounted real RSS growth ~3x.

The value is measured by walking its object graph with ``sys.getsizeof`` (each
object once; objects every process shares, like ``None`` or small ints, not at
all), up to :data:`WALK_CAP` objects; past that the serialized size times
:data:`BIG_VALUE_FACTOR` (measured) stands in, so sizing a huge value costs no
more than a bounded walk. Container costs that ``getsizeof`` cannot see (dict
and set slots with their growth slack, OrderedDict nodes, allocator rounding)
are constants measured with ``bench/l1_memory.py``; ``tests/client/test_l1_memory.py``
checks the total stays within 0.67-1.5x of the RSS an L1 really grows by.

Sizing runs when an entry is built (on the miss/fill path, next to a Redis round
trip and a deserialization of the same value), never on the hit path.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

WALK_CAP = 2000  # objects visited per value before falling back to the serialized size
SAMPLE_OVER = 8  # containers longer than this are sampled...
SAMPLE = 4  # ...on this many evenly spaced items
MAX_DEPTH = 40  # nesting walked (deeper values fall back to the serialized size)
BIG_VALUE_FACTOR = 6  # bytes of Python objects per serialized byte past the cap (JSON rows; measured)
ALLOC_SLACK = 1.05  # pymalloc pools/arenas and size-class rounding over getsizeof (measured)
ODICT_SLOT = 104  # OrderedDict: entry + index with growth slack, and the linked-list node (measured)
TAG_SLOT = 40  # one key in a tag's index set, growth slack included
TAG_SET = sys.getsizeof(set()) + 64  # a tag's index set and its slot in ``by_tag`` (first key of a tag)
_FLOAT = sys.getsizeof(0.5)
_TIMES = 4 * _FLOAT  # soft, hard, keep, early/delta: float objects of their own

_getsizeof = sys.getsizeof
_SHARED: frozenset[int] = frozenset(id(o) for o in (None, True, False, (), "", b"", Ellipsis, NotImplemented,
                                                      *range(-5, 257)))
_ATOMS = frozenset({str, bytes, int, float, bool, type(None), complex})


def value_bytes(value: Any, serialized: int = 0) -> int:
    """Bytes of the object graph under ``value`` (each object counted once, shared singletons not at all).

    Containers longer than :data:`SAMPLE_OVER` are measured on :data:`SAMPLE` evenly spaced items and
    scaled by their length (rows of one shape are alike), which keeps sizing a list of 10 000 rows as cheap
    as sizing a list of 16. Nesting deeper than :data:`MAX_DEPTH` falls back to the serialized size.
    """
    t = type(value)
    if t is str or t is bytes:
        return _getsizeof(value)
    if t in _ATOMS:
        return 0 if id(value) in _SHARED else _getsizeof(value)
    budget = [WALK_CAP]
    n = _walk(value, set(), 0, budget)
    if budget[0] <= 0:
        return max(n, serialized * BIG_VALUE_FACTOR)
    return n


def _walk(o: Any, seen: set[int], depth: int, budget: list[int]) -> int:
    """Bytes of a container (or any non-atom object) and everything under it not seen yet."""
    i = id(o)
    if i in _SHARED or i in seen:
        return 0
    seen.add(i)
    n: int = _getsizeof(o)
    if depth >= MAX_DEPTH or budget[0] <= 0:
        budget[0] = 0
        return n
    depth += 1
    t = type(o)
    if t is dict or isinstance(o, dict):
        budget[0] -= 1 + 2 * len(o)
        if len(o) <= SAMPLE_OVER:
            return n + _items(o.keys(), seen, depth, budget) + _items(o.values(), seen, depth, budget)
        pairs = list(o.items())
        picked = [pairs[int(j * len(pairs) / SAMPLE)] for j in range(SAMPLE)]
        part = _items([k for k, _ in picked], seen, depth, budget) + _items([v for _, v in picked], seen, depth,
                                                                             budget)
        return n + part * len(pairs) // SAMPLE
    if t is list or t is tuple or isinstance(o, (list, tuple, set, frozenset)):
        seq = o if isinstance(o, (list, tuple)) else list(o)
        budget[0] -= 1 + len(seq)
        if len(seq) <= SAMPLE_OVER:
            return n + _items(seq, seen, depth, budget)
        part = _items([seq[int(j * len(seq) / SAMPLE)] for j in range(SAMPLE)], seen, depth, budget)
        return n + part * len(seq) // SAMPLE
    budget[0] -= 1
    d = getattr(o, "__dict__", None)
    if d is not None:
        n += _walk(d, seen, depth, budget)
    return n + _items([v for v in (getattr(o, name, None) for name in getattr(t, "__slots__", ())) if v is not None],
                      seen, depth, budget)


def _items(items: Iterable[Any], seen: set[int], depth: int, budget: list[int]) -> int:
    """Bytes of the children of a container: atoms inline (the common case), the rest by :func:`_walk`."""
    n = 0
    for x in items:
        if type(x) in _ATOMS:
            i = id(x)
            if i not in seen and i not in _SHARED:
                seen.add(i)
                n += _getsizeof(x)
        else:
            n += _walk(x, seen, depth, budget)
    return n


def entry_bytes(entry_object: int, value: Any, tags: tuple[str, ...], generation: str | None,
                serialized: int) -> int:
    """An entry's own bytes: the entry object, its times, tags, generation and value (not its key)."""
    n = entry_object + _TIMES + _getsizeof(tags) + value_bytes(value, serialized)
    for t in tags:
        n += _getsizeof(t)
    if generation is not None:
        n += _getsizeof(generation)
    return int(n * ALLOC_SLACK)


def slot_bytes(key: str, ntags: int) -> int:
    """What holding an entry under ``key`` costs the L1's containers: key string, dict slot, tag-set slots."""
    return int((_getsizeof(key) + ODICT_SLOT + TAG_SLOT * ntags) * ALLOC_SLACK)
