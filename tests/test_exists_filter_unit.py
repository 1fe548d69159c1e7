"""Existence filters, pure logic: sizing, hashing shared by daemon and client, rules validation, planning."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdcd.bloom import BloomParams, params_id, parse_params_id, positions
from cdcd.change import Change, Op, Transaction
from cdcd.config import ConfigError, parse_config
from cdcd.keyspace import Keyspace
from cdcd.sinks.redis import key_slot

BASE = """
source: {dsn: "postgresql://x"}
keyspace: {prefix: "v3:"}
tables:
  users:
    keys: ["user:{id}", "user:email:{email}"]
    action: update
    exists_filter: {key: "user:{id}", expected: 10_000, fp_rate: 0.01, check_every: 1m}
"""


def txn(*changes: Change, version: int = 10) -> Transaction:
    return Transaction(version=version, changes=list(changes), position=version + 1,
                       commit_time=datetime(2024, 1, 1, tzinfo=UTC))


def test_textbook_size_for_ten_million_keys_at_one_percent() -> None:
    p = BloomParams.sized(10_000_000, 0.01)
    assert p.k == 7 and 95_800_000 < p.m < 95_900_000 and 11.9e6 < p.bytes < 12.0e6
    assert p.fp_rate(0.5) == 0.5 ** 7


def test_positions_are_stable_in_range_and_spread() -> None:
    a = positions("user:42", 1000, 7)
    assert a == positions("user:42", 1000, 7) and len(set(a)) == 7 and all(0 <= x < 1000 for x in a)
    assert a != positions("user:43", 1000, 7)
    assert len(positions("odd\udcff:key", 64, 3)) == 3  # a lone surrogate (undecodable row text) still hashes
    assert parse_params_id(params_id(95, 7, "pair:{a}:{b}")) == (95, 7, "pair:{a}:{b}")


@pytest.mark.parametrize("mutate, message", [
    (lambda y: y.replace('key: "user:{id}"', 'key: "usr:{id}"'),
     r"exists_filter.key 'usr:\{id\}' must be one of this table's keys"),
    (lambda y: y.replace("expected: 10_000", "expected: 0"), "greater than 0"),
    (lambda y: y.replace("expected: 10_000", "expected: 1_000_000_000_000"), "more than one Redis string holds"),
    (lambda y: y.replace("fp_rate: 0.01", "fp_rate: 0.01, rebuild_at: 0.005"), "must be above fp_rate"),
    (lambda y: y.replace("fp_rate: 0.01", "fp_rate: 0.01, bogus: 1"), "exists_filter.bogus: Extra inputs"),
])
def test_config_errors_are_precise(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        parse_config(mutate(BASE), "r.yaml")


def test_inserts_and_key_changing_updates_reach_the_filter_and_resets_are_planned() -> None:
    rules = parse_config(BASE).rules()
    spec = rules.exists["public.users"]
    assert spec.bound == 0.02 and spec.check_every == 60 and spec.params == BloomParams.sized(10_000, 0.01)
    row = {"id": 1, "email": "a@x"}
    b = rules.plan([txn(Change(Op.INSERT, "public", "users", None, row),
                        Change(Op.UPDATE, "public", "users", row, {"id": 1, "email": "b@x"}),  # key unchanged
                        Change(Op.UPDATE, "public", "users", row, {"id": 2, "email": "a@x"}),  # key changed
                        Change(Op.UPDATE, "public", "users", None, {"id": 3, "email": "c@x"}),  # old row unknown
                        Change(Op.DELETE, "public", "users", {"id": 4, "email": "d@x"}, None))])
    assert b.exists == {"public.users": ["user:1", "user:2", "user:3"]} and not b.exists_reset
    degraded = Transaction(version=11, changes=[], position=12, touched={("public", "users"): 5000})
    assert rules.plan([degraded]).exists_reset == {"public.users"}
    assert rules.plan([txn(Change(Op.SCHEMA, "public", "users", None, None))]).exists_reset == {"public.users"}


def test_one_filter_is_one_hash_slot() -> None:
    for rel in ("users", "app.we{ird}name", "x.}y"):
        keys = Keyspace("v1:").exists_filter(rel)
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert all(Keyspace("v1:").is_system(k) for k in keys)


def test_the_commented_example_in_the_example_rules_is_valid() -> None:
    text = (Path(__file__).resolve().parent.parent / "config" / "cdcd.example.yaml").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# exists_filter:"))
    for i in range(start, start + 5):
        lines[i] = lines[i].replace("# ", "", 1)
    spec = parse_config("\n".join(lines)).rules().exists["public.users"]
    assert spec.params == BloomParams.sized(10_000_000, 0.01) and spec.bound == 0.02
