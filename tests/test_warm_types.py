"""``cdcd warm`` writes the daemon's keys and bytes for every column type, not only the ISO-formatted ones.

Warm once read ``column::text``: a cast, which is not the type's output function for every type.
``true::text`` is ``true`` where the replication stream sends ``t`` (so pgtypes decoded it as False
and warm wrote ``false``), and ``char(4)::text`` drops the padding the stream keeps (another key).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from cdcd.warm import warm
from tests.helpers import DaemonThread, make_config, wait_until

_TABLE = """
CREATE TABLE flags (id int PRIMARY KEY, on_ boolean, code char(4), price numeric(10, 2), at timestamptz);
ALTER TABLE flags REPLICA IDENTITY FULL;
"""


def _entries(r: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    keys = [k for k in r.scan_iter(f"{prefix}flag*")]
    return {k: r.hget(k, "d") or b"" for k in keys}


def test_warm_writes_the_daemons_bytes_for_bool_and_char(cfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    sql(_TABLE)
    cfg["tables"] = {"flags": {"keys": ["flag:{id}", "flag:code:{code}", "flag:on:{on_}"], "action": "update"}}
    config = make_config(cfg)
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(config).start()
    try:
        sql("INSERT INTO flags VALUES (1, true, 'ab', 12.5, '2024-02-29 10:11:12+02'), "
            "(2, false, 'abcd', 1, '2024-02-29 10:11:12+00')")

        def six() -> dict[bytes, bytes] | None:
            found = _entries(r, p)
            return found if len(found) == 6 else None

        by_daemon = wait_until(six, what="daemon wrote 2 x 3 keys")
    finally:
        d.stop()
    assert json.loads(by_daemon[f"{p}flag:1".encode()]) == {
        "id": 1, "on_": True, "code": "ab  ", "price": "12.50", "at": "2024-02-29T08:11:12+00:00"}
    assert f"{p}flag:code:ab  ".encode() in by_daemon and f"{p}flag:on:true".encode() in by_daemon
    r.delete(*by_daemon)
    report = warm(config, rate=0)
    assert report.tables[0].written == 6
    assert _entries(r, p) == by_daemon  # same keys, byte-identical values
