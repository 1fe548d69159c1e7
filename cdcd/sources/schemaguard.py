"""Schema guard: rules are bound to tables by identity, and a schema change that breaks a rule is loud and safe.

Why: rules name tables and columns, but a running database renames, drops and
alters them. Matching changes to rules by name alone turns ``ALTER TABLE acct
RENAME TO acct_r`` into silently "unmapped" changes, and a dropped key column
into keys that can no longer be rendered: cached entries stay stale while the
daemon reports ready. The guard instead

* binds each rules table to its relation OID (Postgres) and to the columns its
  rules need (templates and the ``update`` projection);
* notices a rename, a drop, or a needed column gone (pgoutput Relation
  messages, a periodic catalog check, or a Debezium record's field list);
* marks the rule *broken*: one SCHEMA change is injected into the ordered change
  stream (the planner bumps the table tag at that version, so every entry derived
  from the table is invalidated at once and the checkpoint moves only after Redis
  has it), and every later change of that table becomes the same tag bump, never
  a silent skip. Readiness turns false with the reason and the fix, until the
  rules are fixed and the daemon restarted. Every other table keeps flowing.

The guard is pure logic apart from :meth:`PgSchemaGuard.check_catalog`, which
runs one catalog query on a connection the Postgres source hands it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from cdcd.change import Change, Op, Transaction
from cdcd.pg import catalog
from cdcd.pg.pgoutput import Relation
from cdcd.rules import TableRule, Template

log = structlog.get_logger("cdcd.schema")

CATALOG_CHECK_EVERY = 1.0  # seconds between catalog checks when no Relation message asked for one


def needed_columns(rule: TableRule) -> set[str]:
    """Every column a rule reads: its key and tag templates and its ``update`` projection."""
    return rule.template_columns() | set(rule.columns or ())


def _split(relation: str) -> tuple[str, str]:
    schema, _, table = relation.partition(".")
    return schema, table


@dataclass(frozen=True, slots=True)
class Breakage:
    """One rules table broken by a schema change: what was seen and what the operator must change."""

    relation: str  # the rules' name of the table, e.g. public.acct
    kind: str  # "renamed" | "dropped" | "column_lost"
    seen: str  # the DDL (or record) that showed it
    fix: str  # what to change in the rules

    @property
    def reason(self) -> str:
        return (f"schema change broke the rule tables.{self.relation}: {self.seen}; its table tag was bumped and "
                f"every later change of it only bumps that tag. Fix: {self.fix}, then restart cdcd")


class SchemaGuard:
    """Broken-rule bookkeeping and the stream rewrite, shared by every source.

    With ``check_rows`` (the Kafka source), each change's row is checked against the columns its rule needs:
    a Debezium record carries every column of its table version, so a needed column missing from the
    record means the table lost it. The broken state lives in this process only: after a restart the first
    record with the old schema breaks the rule again (and bumps the tag again, the safe direction).
    """

    def __init__(self, tables: Mapping[str, TableRule], check_rows: bool = False) -> None:
        """``tables``: the rules' table rules by ``schema.table``."""
        self.tables = tables
        self.check_rows = check_rows
        self.needed: dict[str, set[str]] = {rel: needed_columns(rule) for rel, rule in tables.items()}
        self.broken: dict[str, Breakage] = {}
        self.aliases: dict[tuple[str, str], str] = {}  # a broken table's names (old and new) -> rules relation
        # names whose current stream shape lacks a needed column, not (yet) known broken: tag bumps only
        self.stale_shape: dict[tuple[str, str], str] = {}
        self._shape_fixed: set[tuple[str, str]] = set()  # stale shapes replaced by a whole one: drop after filter
        self._unannounced: list[str] = []  # broken, but no SCHEMA change has entered the stream yet
        self._events: list[Breakage] = []

    # ---------------------------------------------------------------- state

    def mark(self, relation: str, kind: str, seen: str, fix: str, names: Iterable[tuple[str, str]] = ()) -> None:
        """Record a broken rule (once); ``names`` are further names its changes arrive under."""
        for name in (_split(relation), *names):
            self.aliases[name] = relation
        if relation in self.broken:
            return
        b = Breakage(relation, kind, seen, fix)
        self.broken[relation] = b
        self._unannounced.append(relation)
        self._events.append(b)

    def pending(self) -> bool:
        """A break is known but its tag bump has not been handed to the daemon yet."""
        return bool(self._unannounced)

    def take_events(self) -> list[Breakage]:
        """New breaks since the last call (the daemon counts and logs each once)."""
        events, self._events = self._events, []
        return events

    def reasons(self) -> list[str]:
        return [b.reason for b in self.broken.values()]

    # ---------------------------------------------------------------- the stream

    def _check_row_fields(self, txn: Transaction) -> None:
        for change in txn.changes:
            if change.op is Op.TRUNCATE or change.op is Op.SCHEMA:
                continue
            rel = change.relation
            needed = self.needed.get(rel)
            if needed is None or rel in self.broken:
                continue
            row = change.after if change.after is not None else change.before
            if row is None or needed <= row.keys():
                continue
            missing = sorted(needed - row.keys())
            offset = getattr(txn.position, "offset", txn.position)
            self.mark(rel, "column_lost",
                      f"the change record at {txn.origin or 'the source'} offset {offset} (version {txn.version}) "
                      f"has no field {missing} in its row schema (fields: {', '.join(sorted(row))}): the column "
                      f"was dropped or renamed (ALTER TABLE ... DROP COLUMN or RENAME COLUMN)",
                      _column_fix(self.tables[rel], rel, missing))

    def filter(self, txns: list[Transaction], version: int = 0) -> list[Transaction]:
        """Rewrite changes of broken tables into one SCHEMA change per transaction; announce new breaks.

        A new break is announced in the last transaction of the batch (at its version), or in a
        transaction of its own at ``version`` when the batch has none.
        """
        if self.check_rows:
            for txn in txns:
                self._check_row_fields(txn)
        if not self.aliases and not self.stale_shape:
            return txns
        aliases = {**self.stale_shape, **self.aliases}
        for txn in txns:
            if txn.touched:  # a degraded transaction: its broken tables still get their bump
                for name in [n for n in txn.touched if n in aliases]:
                    del txn.touched[name]
                    txn.changes.append(Change(Op.SCHEMA, *_split(aliases[name])))
            if not any((c.schema, c.table) in aliases for c in txn.changes):
                continue
            seen: set[str] = set()
            out: list[Change] = []
            for c in txn.changes:
                rel = aliases.get((c.schema, c.table))
                if rel is None:
                    out.append(c)
                elif rel not in seen:
                    seen.add(rel)
                    out.append(Change(Op.SCHEMA, *_split(rel)))
            txn.changes = out
        for name in self._shape_fixed:
            self.stale_shape.pop(name, None)
        self._shape_fixed.clear()
        if self._unannounced:
            if not txns:
                txns = [Transaction(version=version, changes=[], position=None, origin="schema-guard")]
            last = txns[-1]
            have = {c.relation for c in last.changes if c.op is Op.SCHEMA}
            last.changes.extend(Change(Op.SCHEMA, *_split(rel)) for rel in self._unannounced if rel not in have)
            self._unannounced = []
        return txns


class PgSchemaGuard(SchemaGuard):
    """Postgres: rules bound to relation OIDs, checked on Relation messages and against the catalog."""

    def __init__(self, tables: Mapping[str, TableRule]) -> None:
        super().__init__(tables, check_rows=False)
        self.oids: dict[int, str] = {}  # relation OID -> rules relation
        self.bound: dict[str, int] = {}
        self._recheck = True
        self._last_check = 0.0
        self._ident_warned: set[tuple[int, str]] = set()

    def bind(self, relation: str, oid: int) -> None:
        """The startup (or reconnect) check found ``relation`` as ``oid`` in the catalog."""
        old = self.bound.get(relation)
        if old is not None and old != oid and relation not in self.broken:
            self.mark(relation, "dropped",
                      f"table {relation} was replaced (relation OID {old} is gone, {relation} is now OID {oid}: "
                      f"DROP TABLE and CREATE TABLE, or a rename)",
                      f"check that tables.{relation} still describes the new table")
        self.bound[relation] = oid
        self.oids[oid] = relation

    def on_relation(self, rel: Relation) -> None:
        """A pgoutput Relation message (sent before the first change of a table after DDL). No I/O here."""
        relation = self.oids.get(rel.oid)
        name = (rel.schema, rel.table)
        if relation is None:
            if f"{rel.schema}.{rel.table}" in self.needed:
                self._recheck = True  # a rules name under an unknown OID: the bound table was replaced
            return
        if relation in self.broken:
            self.aliases[name] = relation
            return
        if f"{rel.schema}.{rel.table}" != relation:
            self._recheck = True  # a rename, or a replay of changes made under an older name: ask the catalog
        if self.needed[relation] - set(rel.names):
            # Rows of this shape cannot name their keys: they become tag bumps. Whether the rule is broken is
            # the catalog's call (a replay after a restart can show a shape older than a column the rules
            # now use, which is no break): checked at the end of this poll.
            self.stale_shape[name] = relation
            self._recheck = True
            return
        if name in self.stale_shape:
            self._shape_fixed.add(name)
        self._check_identity(rel, relation)

    def _check_identity(self, rel: Relation, relation: str) -> None:
        """A needed column outside the replica identity: updates and deletes cannot name the old keys."""
        if rel.replica_identity == "f":
            return
        keys = {c for c, k in zip(rel.names, rel.keyflags, strict=True) if k}
        extra = sorted(self.tables[relation].template_columns() - keys)
        if not extra or (rel.oid, rel.replica_identity) in self._ident_warned:
            return
        self._ident_warned.add((rel.oid, rel.replica_identity))
        schema, table = _split(relation)
        ident = catalog.IDENTITY_NAMES.get(rel.replica_identity, "?")
        log.warning("replica_identity", table=relation,
                    detail=f"{relation} has REPLICA IDENTITY {ident}: the "
                           f"old values of {extra} are not sent, so an update that changes them cannot drop the old "
                           f"keys/tags. Run: ALTER TABLE \"{schema}\".\"{table}\" REPLICA IDENTITY FULL;")

    def request_check(self) -> None:
        self._recheck = True

    def check_due(self) -> bool:
        return self._recheck or time.monotonic() - self._last_check >= CATALOG_CHECK_EVERY

    def check_catalog(self, conn: Any) -> None:
        """Compare every bound, unbroken rule with the catalog: gone, renamed, or missing a needed column."""
        self._recheck = False
        self._last_check = time.monotonic()
        live = {rel: oid for rel, oid in self.bound.items() if rel not in self.broken}
        if not live:
            return
        found = catalog.live_columns(conn, list(live.values()))
        for relation, oid in live.items():
            cur = found.get(oid)
            if cur is None:
                self.mark(relation, "dropped", f"table {relation} (relation OID {oid}) was dropped (DROP TABLE)",
                          f"remove tables.{relation} from the rules, or recreate the table (and add it to the "
                          f"publication)")
                continue
            schema, table, columns = cur
            if f"{schema}.{table}" != relation:
                self.mark(relation, "renamed",
                          f"table {relation} was renamed to {schema}.{table} (ALTER TABLE ... RENAME / SET SCHEMA; "
                          f"same relation OID {oid})",
                          f"rename tables.{relation} to {schema}.{table} in the rules (clients deriving the table "
                          f"tag #table:{relation} must follow), or rename the table back",
                          names=[(schema, table)])
                continue
            missing = sorted(self.needed[relation] - columns)
            if missing:
                self.mark(relation, "column_lost",
                          f"the columns {missing} of {relation} are gone (ALTER TABLE ... DROP COLUMN or RENAME "
                          f"COLUMN; columns now: {', '.join(sorted(columns))})",
                          _column_fix(self.tables[relation], relation, missing))


def _column_fix(rule: TableRule, relation: str, missing: list[str]) -> str:
    uses = [t for t in (*rule.keys, *rule.tags) if set(Template.parse(t).columns) & set(missing)]
    if rule.columns and set(rule.columns) & set(missing):
        uses.append(f"columns: {sorted(set(rule.columns) & set(missing))}")
    return (f"change {', '.join(repr(u) for u in uses)} in tables.{relation} to existing columns "
            f"(or restore {missing})")
