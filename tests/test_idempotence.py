"""Re-delivery and out-of-order delivery of the same changes leave Redis's entries identical."""

from __future__ import annotations

import random
from typing import Any

import redis

from cdcd.backplane import Sequencer
from cdcd.change import Transaction
from cdcd.sinks.redis import RedisSink
from cdcd.sources.postgres import PostgresSource
from tests.helpers import entries, make_config, wait_until


def test_replayed_and_shuffled_transactions_change_nothing(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    config = make_config(cfg)
    rules = config.rules()
    p = rules.keyspace.prefix
    source = PostgresSource(config.source, rules.source)
    source.connect()
    try:
        for i in range(1, 21):
            sql("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, %s)",
                (i, f"u{i}@x", f"n{i}", i % 3))
        for i in range(1, 21, 2):
            sql("UPDATE users SET name = name || '-2', email = %s WHERE id = %s", (f"v{i}@x", i))
        for i in range(1, 21, 4):
            sql("DELETE FROM users WHERE id = %s", (i,))
        sql("INSERT INTO orders VALUES (1, 1, 1, 1.00, 'new')")
        sql("UPDATE orders SET status = 'paid' WHERE id = 1")
        txns: list[Transaction] = []
        wait_until(lambda: txns.extend(t for t in source.poll(0.2) if isinstance(t, Transaction)) or len(txns) >= 37,
                   what="all transactions read from the slot")
    finally:
        source.close()  # nothing acked: the slot would re-deliver all of it
    assert len(txns) == 37

    sink = RedisSink(r, rules, Sequencer("cdcd"))
    sink.prepare()
    for t in txns:  # in order, one batch each
        sink.apply(rules.plan([t]))
    first = entries(r, p)
    assert len(first) >= 30
    tags_first = {k: int(r.get(k)) for k in r.scan_iter(match=f"{p}#tag:*")}

    for t in reversed(txns):  # out of order
        res = sink.apply(rules.plan([t]))
        assert res.applied == 0  # every write refused: Redis already holds that version or newer
    random.Random(7).shuffle(txns)
    sink.apply(rules.plan(txns))  # all at once, shuffled
    after = entries(r, p)
    # identical values and versions; a refused older tombstone still moves the generation (it fences fills in
    # flight, docs/versions.md), so generations only move forward
    assert {k: {f: x for f, x in e.items() if f != "g"} for k, e in after.items()} == \
        {k: {f: x for f, x in e.items() if f != "g"} for k, e in first.items()}
    assert all(int(after[k]["g"]) >= int(e["g"]) for k, e in first.items())
    tags_after = {k: int(r.get(k)) for k in r.scan_iter(match=f"{p}#tag:*")}
    assert all(tags_after[k] >= v for k, v in tags_first.items())  # tags only move forward (extra invalidations)
