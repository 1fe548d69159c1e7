"""Rule compilation and planning (pure logic): which writes and tag bumps a change produces."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from cdcd.change import UNAVAILABLE, Change, Invalidation, Op, Transaction
from cdcd.config import ConfigError, parse_config
from cdcd.rules import Template, render_value
from cdcd.sinks.epochs import TableEpochs

BASE = """
source: {dsn: "postgresql://x"}
keyspace: {prefix: "v3:"}
tables:
  users:
    keys: ["user:{id}", "user:email:{email}"]
    tags: ["tenant:{tenant_id}"]
    action: update
    columns: [id, email, tenant_id]
  app.audit:
    keys: ["audit:{id}"]
"""


def rules():  # type: ignore[no-untyped-def]
    return parse_config(BASE).rules()


def txn(*changes: Change, version: int = 10) -> Transaction:
    return Transaction(version=version, changes=list(changes), position=version + 1,
                       commit_time=datetime(2024, 1, 1, tzinfo=UTC))


def user(uid: int, email: str, tenant: int) -> dict[str, object]:
    return {"id": uid, "email": email, "tenant_id": tenant, "name": "x"}


def test_template_parsing_and_rendering() -> None:
    t = Template.parse("a:{x}:{y}:z")
    assert t.columns == ("x", "y") and t.render({"x": 1, "y": "b"}) == "a:1:b:z"
    assert Template.parse("{{literal}}:{x}").render({"x": True}) == "{literal}:true"
    for bad in ("a:{x!r}", "a:{x:>3}", "a:{0}", "a:{x.y}", "a:{"):
        with pytest.raises(ValueError):
            Template.parse(bad)
    assert render_value(Decimal("1.50")) == "1.50" and render_value(date(2024, 1, 2)) == "2024-01-02"
    assert render_value(b"\x01\xff") == "01ff" and render_value({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_insert_writes_projection_with_table_snapshot() -> None:
    r = rules()
    b = r.plan([txn(Change(Op.INSERT, "public", "users", None, user(1, "a@x", 7)))])
    assert set(b.writes) == {"v3:user:1", "v3:user:email:a@x"}
    w = b.writes["v3:user:1"]
    assert w.version == 10 and w.table_tag == "#table:public.users"
    assert json.loads(w.data or b"") == {"id": 1, "email": "a@x", "tenant_id": 7}  # projection: no "name"
    assert b.tags == {"tenant:7"}
    # the value records its table's counter, which the sink (not the rules) knows at run time
    epochs = TableEpochs()
    epochs.set("#table:public.users", b"100")
    assert epochs.snapshot("#table:public.users") == '{"#table:public.users":"100"}'
    epochs.moved("#table:public.users", 101)
    epochs.moved("#table:public.other", 5)  # not a tracked table tag: ignored
    assert epochs.snapshot("#table:public.users") == '{"#table:public.users":"101"}'
    assert "#table:public.other" not in epochs and epochs.snapshot("#table:public.other") == ""


def test_key_column_update_tombstones_the_old_key_and_bumps_both_tags() -> None:
    b = rules().plan([txn(Change(Op.UPDATE, "public", "users", user(1, "a@x", 7), user(1, "b@x", 8)))])
    assert b.writes["v3:user:email:a@x"].data is None  # tombstone
    assert b.writes["v3:user:email:b@x"].data is not None
    assert b.tags == {"tenant:7", "tenant:8"}


def test_delete_without_full_identity_reports_unresolvable_keys() -> None:
    before = {"id": 1, "email": UNAVAILABLE, "tenant_id": UNAVAILABLE, "name": UNAVAILABLE}
    b = rules().plan([txn(Change(Op.DELETE, "public", "users", before, None))])
    assert set(b.writes) == {"v3:user:1"} and b.writes["v3:user:1"].data is None
    kinds = {(p.kind, p.detail.split(":")[0]) for p in b.problems}
    assert ("unresolvable_key", "delete") in kinds
    assert any("REPLICA IDENTITY FULL" in p.detail and p.position == 11 for p in b.problems)


def test_unsent_toast_column_invalidates_instead_of_writing() -> None:
    after = {**user(1, "a@x", 7), "tenant_id": UNAVAILABLE}
    b = rules().plan([txn(Change(Op.UPDATE, "public", "users", None, after))])
    assert set(b.writes) == {"v3:user:1", "v3:user:email:a@x"}
    assert all(w.data is None for w in b.writes.values())  # projection lacks a value: tombstones, never a guess


def test_truncate_bumps_the_table_tag_and_later_values_become_tombstones() -> None:
    b = rules().plan([txn(Change(Op.TRUNCATE, "public", "users")),
                      txn(Change(Op.INSERT, "public", "users", None, user(3, "c@x", 1)), version=12)])
    assert "#table:public.users" in b.tags
    assert b.writes["v3:user:3"].data is None


def test_batch_keeps_the_newest_write_per_key_and_counts_everything() -> None:
    b = rules().plan([txn(Change(Op.INSERT, "public", "users", None, user(1, "a@x", 7)), version=20),
                      txn(Change(Op.DELETE, "public", "users", user(1, "a@x", 7), None), version=30),
                      txn(Change(Op.INSERT, "public", "nope", None, {"id": 1}), version=31),
                      Transaction(version=32, changes=[], position=33, invalidations=[Invalidation(["k"], ["t"])])])
    assert b.writes["v3:user:1"].version == 30 and b.writes["v3:user:1"].data is None
    assert b.version == 32 and b.transactions == 4
    assert b.counts[("public.users", "c")] == 1 and b.counts[("public.nope", "c")] == 1
    assert [p.kind for p in b.problems] == ["unmapped_table"]
    assert b.writes["v3:k"].data is None and "t" in b.tags


def test_null_key_column_means_no_such_key() -> None:
    b = rules().plan([txn(Change(Op.INSERT, "public", "users", None, {"id": 1, "email": None, "tenant_id": None}))])
    assert set(b.writes) == {"v3:user:1"} and not b.tags and not b.problems


@pytest.mark.parametrize("mutate, message", [
    (lambda y: y.replace("action: update", "action: update\n    bogus: 1"), "tables.users.bogus: Extra inputs"),
    (lambda y: y.replace('keys: ["audit:{id}"]', "keys: []"), "needs at least one key or tag"),
    (lambda y: y.replace('["user:{id}", ', '["#x:{id}", '), "reserved for cdcd"),
    (lambda y: y.replace('["user:{id}", ', '["user:{id}{email}", '),
     r"the text between \{id\} and \{email\} must contain ':'"),
    (lambda y: y.replace('prefix: "v3:"', 'prefix: "v3#"'), "prefix may not contain '#'"),
    (lambda y: y.replace("  app.audit:", "  a.b.c:"), "is not a table name"),
    (lambda y: y.replace('keys: ["audit:{id}"]', 'keys: ["audit:{id}"]\n    columns: [id]'),
     "'columns' is the projection of action 'update'"),
    (lambda y: y.replace("source: {", "sauce: {"), "source: Field required"),
])
def test_config_errors_are_precise(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        parse_config(mutate(BASE), "r.yaml")


def test_ttl_accepts_durations() -> None:
    c = parse_config(BASE.replace("columns: [id, email, tenant_id]", "columns: [id]\n    ttl: 2h"))
    assert c.rules().by_relation["public.users"].ttl_ms == 7_200_000
    with pytest.raises(ConfigError, match="is not a duration"):
        parse_config(BASE.replace("columns: [id, email, tenant_id]", "ttl: soon"))
