"""Schema guard logic (pure): which changes become table-tag bumps, and when a break is announced."""

from __future__ import annotations

from cdcd.change import Change, Op, Transaction
from cdcd.config import parse_config
from cdcd.pg.pgoutput import Column, Relation
from cdcd.rules import Rules
from cdcd.sources.schemaguard import PgSchemaGuard, SchemaGuard

BASE = """
source: {dsn: "postgresql://x"}
tables:
  acct:
    keys: ["acct:{id}", "acct:email:{email}"]
    action: update
    columns: [id, email, name]
  users:
    keys: ["user:{id}"]
"""


class FakeCatalog:
    """What check_catalog reads: (oid, schema, table, columns) rows of pg_class/pg_attribute."""

    def __init__(self, rows: list[tuple[int, str, str, list[str]]]) -> None:
        self.rows = rows

    def execute(self, _query: str, params: tuple[list[int]]) -> FakeCatalog:
        self.result = [r for r in self.rows if r[0] in params[0]]
        return self

    def fetchall(self) -> list[tuple[int, str, str, list[str]]]:
        return self.result


def rules() -> Rules:
    return parse_config(BASE).rules()


def rel(oid: int, table: str, cols: list[str], ident: str = "f") -> Relation:
    return Relation(oid, "public", table, ident, [Column(c, 25, c == "id") for c in cols])


def txn(version: int, *changes: Change) -> Transaction:
    return Transaction(version=version, changes=list(changes), position=version)


def test_lost_column_breaks_the_rule_and_rewrites_later_changes() -> None:
    g = PgSchemaGuard(rules().source)
    g.bind("public.acct", 10)
    g.bind("public.users", 11)
    g.on_relation(rel(10, "acct", ["id", "email", "name"]))
    assert not g.broken
    g.on_relation(rel(10, "acct", ["id", "name"]))
    assert not g.broken and g.check_due()  # the catalog decides
    g.check_catalog(FakeCatalog([(10, "public", "acct", ["id", "name"]), (11, "public", "users", ["id"])]))
    assert set(g.broken) == {"public.acct"} and g.broken["public.acct"].kind == "column_lost"
    assert "'acct:email:{email}'" in g.broken["public.acct"].fix and "REPLICA" not in g.reasons()[0]
    out = g.filter([txn(5, Change(Op.UPDATE, "public", "acct", None, {"id": 1, "name": "x"}),
                        Change(Op.UPDATE, "public", "acct", None, {"id": 2, "name": "y"}),
                        Change(Op.INSERT, "public", "users", None, {"id": 3}))])
    assert [(c.op, c.table) for c in out[0].changes] == [(Op.SCHEMA, "acct"), (Op.INSERT, "users")]
    assert [b.kind for b in g.take_events()] == ["column_lost"] and g.take_events() == []
    assert not g.pending()
    # the planner turns the SCHEMA change into a table tag bump, and never a value for that table
    batch = rules().plan(g.filter([txn(6, Change(Op.INSERT, "public", "acct", None, {"id": 9, "name": "z"}))]))
    assert batch.tags == {"#table:public.acct"} and not batch.writes


def test_replayed_old_shape_is_tag_bumps_but_no_break() -> None:
    g = PgSchemaGuard(rules().source)
    g.bind("public.acct", 10)
    g.on_relation(rel(10, "acct", ["id", "email"]))  # WAL from before `name` was added (and used by the rule)
    g.check_catalog(FakeCatalog([(10, "public", "acct", ["id", "email", "name"])]))
    assert not g.broken and not g.reasons()
    old = txn(1, Change(Op.INSERT, "public", "acct", None, {"id": 1, "email": "a"}))
    g.on_relation(rel(10, "acct", ["id", "email", "name"]))
    new = txn(2, Change(Op.INSERT, "public", "acct", None, {"id": 2, "email": "b", "name": "n"}))
    out = g.filter([old, new])
    assert [c.op for c in out[0].changes] == [Op.SCHEMA]  # coarse but safe within the batch
    nxt = Change(Op.INSERT, "public", "acct", None, {"id": 3, "email": "c", "name": "m"})
    assert g.filter([txn(3, nxt)])[0].changes == [nxt]  # the whole shape flows normally again


def test_break_without_changes_is_announced_in_a_transaction_of_its_own() -> None:
    g = PgSchemaGuard(rules().source)
    g.bind("public.acct", 10)
    g.mark("public.acct", "dropped", "table public.acct was dropped", "remove it")
    assert g.pending()
    (t,) = g.filter([], version=42)
    assert t.version == 42 and t.position is None and [c.op for c in t.changes] == [Op.SCHEMA]
    assert g.filter([]) == []


def test_a_rules_name_under_an_unknown_oid_asks_the_catalog() -> None:
    g = PgSchemaGuard(rules().source)
    g.bind("public.acct", 10)
    g._recheck = False
    g.on_relation(rel(99, "acct", ["id", "email", "name"]))  # dropped and recreated, or renamed away
    assert g.check_due() and not g.broken
    g._recheck = False
    g.on_relation(rel(10, "acct_r", ["id", "email", "name"]))  # renamed (or a replay under an old name)
    assert g.check_due() and not g.broken


def test_identity_default_does_not_hide_a_lost_column_behind_wrong_advice() -> None:
    g = PgSchemaGuard(rules().source)
    g.bind("public.acct", 10)
    g.on_relation(rel(10, "acct", ["id", "name"], ident="d"))
    g.check_catalog(FakeCatalog([(10, "public", "acct", ["id", "name"])]))
    assert "REPLICA IDENTITY" not in g.reasons()[0]


def test_kafka_rows_without_a_needed_field_break_only_their_rule() -> None:
    g = SchemaGuard(rules().source, check_rows=True)
    ok = Change(Op.INSERT, "public", "acct", None, {"id": 1, "email": "a", "name": "n"})
    assert g.filter([txn(1, ok)])[0].changes == [ok] and not g.broken
    out = g.filter([txn(2, Change(Op.UPDATE, "public", "acct", None, {"id": 1, "name": "n"}),
                        Change(Op.DELETE, "public", "users", {"id": 1}, None))])
    assert [(c.op, c.table) for c in out[0].changes] == [(Op.SCHEMA, "acct"), (Op.DELETE, "users")]
    assert "version 2" in g.broken["public.acct"].seen


def test_a_degraded_transaction_touching_a_broken_table_still_bumps_its_tag() -> None:
    """A transaction past the row cap keeps only per-table counts; a renamed (broken) table in it must still
    bump the rule's table tag, never be dropped as unmapped."""
    g = PgSchemaGuard(rules().source)
    g.bind("public.acct", 10)
    g.on_relation(rel(10, "acct_r", ["id", "name", "email"]))
    g.check_catalog(FakeCatalog([(10, "public", "acct_r", ["id", "name", "email"]), (11, "public", "users", ["id"])]))
    assert set(g.broken) == {"public.acct"}
    g.filter([])
    big = Transaction(version=7, changes=[], position=None, touched={("public", "acct_r"): 50_000})
    batch = rules().plan(g.filter([big]))
    assert "#table:public.acct" in batch.tags and not batch.writes
    assert not [p for p in batch.problems if p.kind == "unmapped_table"]
