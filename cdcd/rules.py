"""Rules: which cache keys and tags a table's row maps to, and what to do when it changes.

Declared in YAML (see ``config/cdcd.example.yaml``), validated by pydantic at
load, compiled once into templates, then used on the hot path to turn a
transaction into a :class:`Batch` of versioned writes and tag bumps.

The mapping of one change, per table rule:

* insert / snapshot read: new row's keys get the projection (``update``) or a
  tombstone (``invalidate``); new row's tags are bumped;
* update: new keys as above; keys of the old row that the new row no longer
  maps to get tombstones (an e-mail change must drop ``user:email:{old}``); old
  and new tags are bumped. Old values need ``REPLICA IDENTITY FULL`` unless
  every template column is in the replica identity;
* delete: old keys get tombstones, old tags are bumped;
* truncate: the table tag ``#table:<schema>.<table>`` is bumped, which every
  entry derived from the table records, so it is O(1) whatever the table size,
  and the table's *floor* is raised to the truncate's version: the sink turns any
  value write of that table at or below its floor into a tombstone, so an older
  insert applied late (another partition, a replay) never becomes a valid value;
* a degraded transaction (a source stopped keeping its rows past a cap) counts
  as a truncate of every table it touched, at its commit version.
"""

from __future__ import annotations

import base64
import json
import json.encoder
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cdcd.bloom import BloomParams, params_id
from cdcd.change import UNAVAILABLE, Change, Op, Reads, Row, Transaction
from cdcd.durations import parse_duration
from cdcd.keys import Template as Template  # re-exported: key templates live in cdcd.keys
from cdcd.keys import render_value as render_value
from cdcd.keyspace import REPLICA_UNIVERSE, Keyspace, replica_slots

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


# ------------------------------------------------------------------------------ values


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    raise TypeError(f"cannot encode {type(v).__name__} as JSON")


_FAST_DEFAULT: dict[type, Any] = {datetime: datetime.isoformat, Decimal: str, date: date.isoformat}


_last_datetime: tuple[datetime | None, str] = (None, "")


def _fast_default(v: Any) -> Any:
    global _last_datetime
    if type(v) is datetime:
        # The rows of a transaction usually share a timestamp object (the decoder's ``_last_one``), and
        # isoformat of an aware datetime was half of a projection's cost: remember the last one. By
        # identity: the cache holds the object, so its id cannot be reused meanwhile.
        last = _last_datetime
        if v is last[0]:
            return last[1]
        text = v.isoformat()
        _last_datetime = (v, text)
        return text
    f = _FAST_DEFAULT.get(type(v))
    return f(v) if f is not None else _json_default(v)


# The C encoder built once (json.dumps builds a JSONEncoder and a C encoder per call, which was half the
# cost of a projection); same output as json.dumps(row, default=..., separators=(",", ":"),
# ensure_ascii=False). Falls back to that where the C accelerator is missing.
_make = getattr(json.encoder, "c_make_encoder", None)
_basestring = getattr(json.encoder, "c_encode_basestring", None)
_C_ENCODE: Any = (_make(None, _fast_default, _basestring, None, ":", ",", False, False, True)
                  if _make is not None and _basestring is not None else None)


def encode_projection(row: Row) -> bytes:
    """JSON of an ``update`` rule's projection: numerics as strings (no precision loss),
    temporals ISO 8601, bytea base64, json/jsonb as nested JSON."""
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(row, 0)).encode()
    return json.dumps(row, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------ templates


# ------------------------------------------------------------------------------ models


def _seconds(v: Any) -> Any:
    """Accept 600, 600.0, "600", "600s", "10m", "2h", "1d" (the client's options parse the same: cdcd.durations)."""
    return parse_duration(v) if isinstance(v, str) else v


class ExistsFilterRule(BaseModel):
    """``exists_filter:`` of a table: a Bloom filter of the keys that exist (docs/existence-filter.md)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="one of the table's key templates: the keys whose existence the filter answers")
    expected: int = Field(default=1_000_000, gt=0, description="keys the filter is sized for")
    fp_rate: float = Field(default=0.01, gt=0, lt=0.5, description="false-positive rate at 'expected' keys")
    rebuild_at: float | None = Field(default=None, gt=0, lt=1, description="estimated false-positive rate past "
                                     "which the filter is rebuilt from a snapshot (default 2 x fp_rate)")
    check_every: float = Field(default=30.0, gt=0, description="seconds between fill (BITCOUNT) checks")

    _parse_check = field_validator("check_every", mode="before")(_seconds)

    @model_validator(mode="after")
    def _sized(self) -> ExistsFilterRule:
        BloomParams.sized(self.expected, self.fp_rate)  # ValueError: more than one Redis string
        if self.rebuild_at is not None and self.rebuild_at <= self.fp_rate:
            raise ValueError(f"rebuild_at ({self.rebuild_at}) must be above fp_rate ({self.fp_rate}): a fresh "
                             f"filter at its expected size is already at fp_rate")
        return self

    @property
    def bound(self) -> float:
        return self.rebuild_at if self.rebuild_at is not None else min(0.99, 2 * self.fp_rate)


class TableRule(BaseModel):
    """One table's mapping. Unknown fields are an error: a typo must not silently do nothing."""

    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list, description="key templates over columns, e.g. user:{id}")
    tags: list[str] = Field(default_factory=list, description="tag templates, e.g. tenant:{tenant_id}")
    action: Literal["invalidate", "update"] = "invalidate"
    columns: list[str] | None = Field(default=None, description="projection written by action: update (default all)")
    ttl: float | None = Field(default=None, gt=0, description="seconds a value written by action: update lives")
    exists_filter: ExistsFilterRule | None = Field(default=None, description="a Bloom filter of the keys that "
                                                   "exist, kept by the daemon (docs/existence-filter.md)")

    replicas: int | None = Field(default=None, description="hot-key replicas: each key is also kept as this many "
                                 "copies spread over the hash slots, read at random by clients that opt in "
                                 "(read_replicas; docs/hot-keys.md)")

    _parse_ttl = field_validator("ttl", mode="before")(_seconds)

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"replicas must be a whole number of copies from 1 to {REPLICA_UNIVERSE}, not {v!r}")
        if not 1 <= v <= REPLICA_UNIVERSE:
            raise ValueError(f"replicas must be from 1 to {REPLICA_UNIVERSE} (copies of each key, spread over the "
                             f"hash slots), not {v}")
        return v

    @field_validator("keys", "tags")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        for t in v:
            Template.parse(t)  # syntax, '#', and ':' between placeholders (so rendering is injective)
        return v

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for c in v:
                if not _IDENT.match(c):
                    raise ValueError(f"{c!r} is not a column name")
        return v

    @model_validator(mode="after")
    def _something_to_do(self) -> TableRule:
        if not self.keys and not self.tags:
            raise ValueError("a table rule needs at least one key or tag template")
        if self.action == "update" and not self.keys:
            raise ValueError("action 'update' writes values under keys: give at least one key template")
        if self.columns is not None and self.action != "update":
            raise ValueError("'columns' is the projection of action 'update'; this rule invalidates")
        if self.exists_filter is not None and self.exists_filter.key not in self.keys:
            raise ValueError(f"exists_filter.key {self.exists_filter.key!r} must be one of this table's keys "
                             f"{self.keys}: the filter answers for the keys the rules render")
        return self

    def template_columns(self) -> set[str]:
        cols: set[str] = set()
        for t in (*self.keys, *self.tags):
            cols.update(Template.parse(t).columns)
        return cols


class KeyspaceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(default="", description="keyspace version prefix applied to every key, e.g. 'v3:'")
    channel: str | None = Field(default=None, description="backplane channel (default <prefix>#cdcd:bp)")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError("the prefix may not contain whitespace")
        if "#" in v:
            raise ValueError("the prefix may not contain '#': cdcd's own keys live under '<prefix>#'")
        return v


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: float = Field(default=3600.0, gt=0, description="seconds for values written by action: update")
    tombstone_ttl: float = Field(default=60.0, gt=0, description="seconds a tombstone keeps a key's version")

    _parse = field_validator("ttl", "tombstone_ttl", mode="before")(_seconds)


def qualify(name: str) -> str:
    """``users`` -> ``public.users``; ``app.users`` stays."""
    return name if "." in name else f"public.{name}"


# ------------------------------------------------------------------------------ compiled


@dataclass(slots=True)
class CompiledRule:
    relation: str
    action: str
    keys: tuple[Template, ...]
    tags: tuple[Template, ...]
    columns: tuple[str, ...] | None
    ttl_ms: int
    table_tag: str
    exists: Template | None = None  # the existence filter's key template (ExistsSpec), when the rule has one
    replicas: tuple[int, ...] = ()  # hash slots of the key copies (hot-key replicas), none when not replicated


@dataclass(frozen=True, slots=True)
class ExistsSpec:
    """A table's compiled existence filter: the key template, the filter's size, when to rebuild it."""

    relation: str
    template: Template
    params: BloomParams
    bound: float  # estimated false-positive rate past which it is rebuilt
    check_every: float

    @property
    def params_id(self) -> str:
        return params_id(self.params.m, self.params.k, self.template.text)


@dataclass(slots=True)
class Write:
    """One entry write: a value (``data``) or a tombstone (``data is None``)."""

    key: str  # full Redis key, prefix included
    version: int
    data: bytes | None
    ttl_ms: int
    table_tag: str | None = None  # a value records this tag's counter (set by the sink at send time)
    fence: bool = False  # a tombstone whose version is a lower bound only (APPLY kind 'f', docs/versions.md)
    slot: int | None = None  # a hot-key replica's copy: its value records the mirror counters of this slot


@dataclass(slots=True)
class Problem:
    """A change the rules could not fully map: logged with its position, counted, never silent."""

    kind: str  # "unmapped_table" | "unresolvable_key" | "null_key"
    relation: str
    detail: str
    position: Any


@dataclass(slots=True)
class Batch:
    writes: dict[str, Write] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    version: int = 0
    commit_ts: float = 0.0
    oldest_commit_ts: float = 0.0
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    transactions: int = 0
    floors: dict[str, int] = field(default_factory=dict)  # relation -> version of its newest truncate
    degraded_transactions: int = 0
    degraded_changes: int = 0
    # existence filters: relation -> keys (prefix-less) that now exist; relations whose filter lost track
    exists: dict[str, list[str]] = field(default_factory=dict)
    exists_reset: set[str] = field(default_factory=set)

    def raise_floor(self, relation: str, version: int) -> None:
        if version > self.floors.get(relation, -1):
            self.floors[relation] = version

    def put(self, w: Write) -> None:
        old = self.writes.get(w.key)
        if w.fence:
            # A fence comes later in the stream than what the batch holds for the key, whatever the versions
            # say: it wins, and keeps the newer version (as applying both in order would leave in Redis).
            if old is not None and old.version > w.version:
                w = Write(w.key, old.version, None, w.ttl_ms, fence=True)
            self.writes[w.key] = w
        elif old is None or w.version >= old.version:
            self.writes[w.key] = w


class Rules:
    """Compiled rules plus the per-table epochs daemon-written values record."""

    def __init__(self, tables: dict[str, TableRule], keyspace: KeyspaceSettings, defaults: Defaults) -> None:
        self.keyspace = Keyspace(keyspace.prefix, keyspace.channel)
        self.defaults = defaults
        self.tombstone_ttl_ms = int(defaults.tombstone_ttl * 1000)
        self.source: dict[str, TableRule] = {qualify(k): v for k, v in tables.items()}
        if any(r.replicas for r in self.source.values()) and ("{" in keyspace.prefix or "}" in keyspace.prefix):
            raise ValueError("hot-key replicas need a keyspace prefix without '{' or '}': the copies are placed on "
                             "hash slots by a hash tag of their own")
        self.by_relation: dict[str, CompiledRule] = {}
        for rel, rule in self.source.items():
            self.by_relation[rel] = CompiledRule(
                relation=rel, action=rule.action,
                keys=tuple(Template.parse(t) for t in rule.keys),
                tags=tuple(Template.parse(t) for t in rule.tags),
                columns=tuple(rule.columns) if rule.columns is not None else None,
                ttl_ms=int((rule.ttl or defaults.ttl) * 1000),
                table_tag=Keyspace.table_tag(rel),
                exists=Template.parse(rule.exists_filter.key) if rule.exists_filter is not None else None,
                replicas=replica_slots(rule.replicas) if rule.replicas else (),
            )
        self.exists: dict[str, ExistsSpec] = {
            rel: ExistsSpec(rel, Template.parse(x.key), BloomParams.sized(x.expected, x.fp_rate), x.bound,
                            x.check_every)
            for rel, x in ((rel, rule.exists_filter) for rel, rule in self.source.items()) if x is not None}
        self._rule_of: dict[tuple[str, str], CompiledRule] = {
            tuple(rel.split(".", 1)): r for rel, r in self.by_relation.items()}  # type: ignore[misc]
        self._prefix = self.keyspace.prefix
        # hot-key replicas: every tag bump also bumps the tag's mirror in each of these slots
        self.mirror_slots: tuple[int, ...] = tuple(sorted({s for r in self.by_relation.values() for s in r.replicas}))
        self._replicated = [(Template.loose_regex(t), r.replicas)
                            for r in self.by_relation.values() if r.replicas for t in self.source[r.relation].keys]

    def registry(self) -> dict[str, Any]:
        """What clients need to derive table tags from key and tag names, and which keys are replicated
        (published to Redis)."""
        tables: dict[str, Any] = {}
        for rel, r in self.source.items():
            tables[rel] = {"keys": list(r.keys), "tags": list(r.tags), "action": r.action}
            if r.replicas:
                tables[rel]["replicas"] = r.replicas
        doc: dict[str, Any] = {"prefix": self.keyspace.prefix, "tables": tables}
        if self.mirror_slots:
            doc["mirror_slots"] = list(self.mirror_slots)
        return doc

    def replicas_of(self, key: str) -> tuple[int, ...]:
        """The replica slots of an entry named by hand (an invalidation message's key): those of a replicated
        rule whose key template could render it (every match: one more invalidation, never one fewer)."""
        slots: set[int] = set()
        for rx, s in self._replicated:
            if rx.match(key):
                slots.update(s)
        return tuple(sorted(slots))

    def _copies(self, writes: dict[str, Write], key: str, w: Write, slots: tuple[int, ...]) -> None:
        """The replica copies of write ``w`` of entry ``key`` (unprefixed): same version, data and kind, each
        its own versioned write (so every invariant of an entry holds per copy)."""
        replica = self.keyspace.replica
        for slot in slots:
            rk = replica(key, slot)
            old = writes.get(rk)
            if old is None or w.version >= old.version:
                writes[rk] = Write(rk, w.version, w.data, w.ttl_ms, w.table_tag, w.fence, slot)

    def reads(self, schema: str, table: str) -> Reads:
        """The columns the planner reads from this table's rows, so a source can skip decoding the rest.

        The same lookup by name as :meth:`_plan_change`'s: a table without a rule reads nothing (its
        changes are counted as unmapped, whatever their rows). The old row only renders key and tag
        templates; the new row also feeds an ``update`` rule's projection (every column when the rule
        lists none).
        """
        rule = self._rule_of.get((schema, table))
        if rule is None:
            return Reads(frozenset(), frozenset())
        templates = frozenset(c for t in (*rule.keys, *rule.tags) for c in t.columns)
        if rule.action != "update":
            return Reads(templates, templates)
        if rule.columns is None:
            return Reads(None, templates)
        return Reads(templates | frozenset(rule.columns), templates)

    # -------------------------------------------------------------------- explain

    def explain(self, relation: str, row: Row) -> dict[str, list[str]]:
        rule = self.by_relation.get(qualify(relation))
        if rule is None:
            raise KeyError(f"no rule for table {qualify(relation)}")
        keys = [k for k in (t.render(row) for t in rule.keys) if k is not None]
        out = {
            "keys": [self.keyspace.entry(k) for k in keys],
            "tags": [k for k in (t.render(row) for t in rule.tags) if k is not None],
            "unresolved": [t.text for t in (*rule.keys, *rule.tags) if t.render(row) is None],
        }
        if rule.replicas:  # hot-key replicas: the copies the daemon writes beside each key
            out["copies"] = [self.keyspace.replica(k, slot) for k in keys for slot in rule.replicas]
        return out

    # -------------------------------------------------------------------- planning

    def plan(self, txns: list[Transaction], batch: Batch | None = None) -> Batch:
        batch = batch if batch is not None else Batch()
        truncated: set[str] = set()
        plan_change = self._plan_change
        for txn in txns:
            batch.transactions += 1
            if txn.version > batch.version:
                batch.version = txn.version
            if txn.commit_time is not None:
                ts = txn.commit_time.timestamp()
                batch.commit_ts = max(batch.commit_ts, ts)
                batch.oldest_commit_ts = ts if not batch.oldest_commit_ts else min(batch.oldest_commit_ts, ts)
            if txn.touched is not None:
                self._plan_degraded(txn, batch, truncated)
            if txn.fence:
                self._plan_fence(txn, batch, truncated)
                continue
            for change in txn.changes:
                plan_change(change, txn, batch, truncated)
            for inv in txn.invalidations:
                for k in inv.keys:
                    batch.put(Write(self.keyspace.entry(k), txn.version, None, self.tombstone_ttl_ms))
                    if self._replicated:
                        for slot in self.replicas_of(k):
                            rk = self.keyspace.replica(k, slot)
                            batch.put(Write(rk, txn.version, None, self.tombstone_ttl_ms, slot=slot))
                batch.tags.update(inv.tags)
                batch.counts[("(message)", "m")] += 1
        return batch

    def _plan_degraded(self, txn: Transaction, batch: Batch, truncated: set[str]) -> None:
        """A transaction whose rows were not kept: every table it touched is treated as truncated."""
        batch.degraded_transactions += 1
        for (schema, table), n in (txn.touched or {}).items():
            batch.degraded_changes += n
            rule = self._rule_of.get((schema, table))
            rel = rule.relation if rule is not None else f"{schema}.{table}"
            batch.counts[(rel, "degraded")] += n
            if rule is None:
                batch.problems.append(Problem("unmapped_table", rel, "no rule for this table", txn.position))
                continue
            batch.tags.add(rule.table_tag)
            batch.raise_floor(rel, txn.version)
            truncated.add(rel)
            if rule.exists is not None:  # its inserts were not kept: the filter cannot know them
                batch.exists_reset.add(rel)

    def _plan_fence(self, txn: Transaction, batch: Batch, truncated: set[str]) -> None:
        """A transaction whose version does not place it in commit order: every key it touches becomes a fence
        (invalidation only, never a value), planned apart so the hot path stays as it is."""
        scratch = Batch(tags=batch.tags, counts=batch.counts, problems=batch.problems, floors=batch.floors,
                        exists=batch.exists, exists_reset=batch.exists_reset)
        for change in txn.changes:
            self._plan_change(change, txn, scratch, truncated)
        keys = list(scratch.writes)
        keys.extend(self.keyspace.entry(k) for inv in txn.invalidations for k in inv.keys)
        keys.extend(self.keyspace.replica(k, slot) for inv in txn.invalidations for k in inv.keys
                    for slot in (self.replicas_of(k) if self._replicated else ()))
        for inv in txn.invalidations:
            batch.tags.update(inv.tags)
            batch.counts[("(message)", "m")] += 1
        for key in keys:
            batch.put(Write(key, txn.version, None, self.tombstone_ttl_ms, fence=True))

    def _report_unresolved(self, templates: tuple[Template, ...], row: Row, rule: CompiledRule, change: Change,
                           txn: Transaction, batch: Batch) -> None:
        for t in templates:
            missing = t.unresolvable(row)
            if missing:
                batch.problems.append(Problem(
                    "unresolvable_key", rule.relation,
                    f"{change.op.name.lower()}: template {t.text!r} needs {missing} which the source did not "
                    f"send (set REPLICA IDENTITY FULL on {rule.relation})", txn.position))

    @staticmethod
    def _plan_exists(template: Template, rel: str, before: Row | None, after: Row, batch: Batch) -> None:
        """A key that now exists goes into the table's existence filter: an insert's, or an update's whose
        filter key changed (or may have: the old row did not carry its columns)."""
        key = template.render(after)
        if key is None or (before is not None and template.render(before) == key):
            return
        got = batch.exists.get(rel)
        if got is None:
            batch.exists[rel] = [key]
        else:
            got.append(key)

    def _plan_change(self, change: Change, txn: Transaction, batch: Batch, truncated: set[str]) -> None:
        # The planner's hot path (one call per row change): loops are inlined and sentinels compared by
        # identity, because at tens of thousands of changes per second every call and allocation shows.
        rule = self._rule_of.get((change.schema, change.table))
        if rule is None:
            rel = change.relation
            batch.counts[(rel, change.op.value)] += 1
            batch.problems.append(Problem("unmapped_table", rel, "no rule for this table", txn.position))
            return
        rel = rule.relation
        op = change.op
        batch.counts[(rel, op._value_)] += 1  # not op.value (a descriptor) nor a dict on Op (Python __hash__)
        if op is Op.TRUNCATE or op is Op.SCHEMA:  # a schema break invalidates like a truncate
            batch.tags.add(rule.table_tag)
            batch.raise_floor(rel, txn.version)
            truncated.add(rel)
            if op is Op.SCHEMA and rule.exists is not None:  # keys may no longer render: rebuild the filter
                batch.exists_reset.add(rel)
            return
        version = txn.version
        prefix = self._prefix
        writes = batch.writes
        tags = batch.tags
        before, after = change.before, change.after
        if rule.exists is not None and after is not None:
            self._plan_exists(rule.exists, rel, before, after, batch)
        new_keys: list[str] = []
        if after is not None:
            for t in rule.keys:
                k = t.render(after)
                if k is None:  # NULL/empty: no such key; or a column the source did not send
                    self._report_unresolved((t,), after, rule, change, txn, batch)
                    continue
                new_keys.append(k)
            for t in rule.tags:
                k = t.render(after)
                if k is not None:
                    tags.add(k)
        if before is not None:
            # Old keys: only report unresolvable ones for deletes; for updates without the old row
            # the startup check already warned that old keys cannot be dropped.
            report = op is Op.DELETE
            tombstone_ttl = self.tombstone_ttl_ms
            for t in rule.keys:
                k = t.render(before)
                if k is None:
                    if report:
                        self._report_unresolved((t,), before, rule, change, txn, batch)
                    continue
                if k not in new_keys:
                    key = prefix + k
                    old = writes.get(key)
                    if old is None or version >= old.version:
                        w = writes[key] = Write(key, version, None, tombstone_ttl)
                        if rule.replicas:
                            self._copies(writes, k, w, rule.replicas)
            for t in rule.tags:
                k = t.render(before)
                if k is None:
                    if report:
                        self._report_unresolved((t,), before, rule, change, txn, batch)
                    continue
                tags.add(k)
        if not new_keys:
            return
        data: bytes | None = None
        if rule.action == "update" and after is not None and rel not in truncated:
            proj = after if rule.columns is None else {c: after.get(c, UNAVAILABLE) for c in rule.columns}
            if UNAVAILABLE not in proj.values():
                data = encode_projection(proj)
        if data is not None:
            ttl, table_tag = rule.ttl_ms, rule.table_tag
            for k in new_keys:
                key = prefix + k
                old = writes.get(key)
                if old is None or version >= old.version:
                    w = writes[key] = Write(key, version, data, ttl, table_tag)
                    if rule.replicas:
                        self._copies(writes, k, w, rule.replicas)
        else:
            # invalidate rule, a projection with an unsent (TOAST) column, or a table truncated
            # earlier in this batch: a tombstone is always safe.
            tombstone_ttl = self.tombstone_ttl_ms
            for k in new_keys:
                key = prefix + k
                old = writes.get(key)
                if old is None or version >= old.version:
                    w = writes[key] = Write(key, version, None, tombstone_ttl)
                    if rule.replicas:
                        self._copies(writes, k, w, rule.replicas)
