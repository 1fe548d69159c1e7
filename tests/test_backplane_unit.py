"""The backplane message format and batch splitting (docs/consistency.md#the-backplane): pure logic."""

from __future__ import annotations

import json

from cdcd.backplane import MAX_ITEMS_PER_MESSAGE, Message, Sequencer


def test_a_large_batch_is_split_with_one_sequence_number_per_message() -> None:
    seq = Sequencer("cdcd", run="r1")
    keys = [f"v1:user:{i}" for i in range(MAX_ITEMS_PER_MESSAGE + 100)]
    tags = [f"tenant:{i}" for i in range(450)]
    msgs = list(seq.messages(keys, tags, "42", 1.5))
    assert MAX_ITEMS_PER_MESSAGE == 500
    assert [m.seq for m in msgs] == [1, 2, 3]
    assert all(len(m.keys) + len(m.tags) <= MAX_ITEMS_PER_MESSAGE for m in msgs)
    assert [k for m in msgs for k in m.keys] == keys and [t for m in msgs for t in m.tags] == tags
    assert {(m.run, m.version, m.ts) for m in msgs} == {("r1", "42", 1.5)}
    assert list(seq.messages([], [], "43", 2.0)) == []  # nothing changed: no message, no number spent


def test_wire_format_uses_the_documented_compact_names() -> None:
    msg = Message(origin="cdcd", run="3f2a", seq=17, version="26535080", keys=["v1:user:1"], tags=["tenant:7"],
                  ts=1795418158.95)
    assert json.loads(msg.encode()) == {"o": "cdcd", "r": "3f2a", "s": 17, "v": "26535080", "k": ["v1:user:1"],
                                        "t": ["tenant:7"], "ts": 1795418158.95}
    assert Message.decode(msg.encode()) == msg


def test_split_matches_the_item_by_item_split_for_every_boundary() -> None:
    """Keys then tags, MAX_ITEMS_PER_MESSAGE items a message, whatever the counts (slices vs a reference)."""
    M = MAX_ITEMS_PER_MESSAGE
    for nk, nt in [(0, 1), (1, 0), (M, 0), (0, M), (M - 1, 1), (M - 1, 2), (M, 1), (M + 1, M - 1), (2 * M + 3, 7),
                   (3, 2 * M + 1)]:
        keys, tags = [f"k{i}" for i in range(nk)], [f"t{i}" for i in range(nt)]
        items = [(True, k) for k in keys] + [(False, t) for t in tags]
        chunks = [items[s:s + M] for s in range(0, len(items), M)]
        want = [([x for is_key, x in c if is_key], [x for is_key, x in c if not is_key]) for c in chunks]
        msgs = list(Sequencer("cdcd", run="r").messages(iter(keys), iter(tags), "1", 0.0))
        assert [(m.keys, m.tags) for m in msgs] == want, (nk, nt)
        assert [m.seq for m in msgs] == list(range(1, len(want) + 1))
