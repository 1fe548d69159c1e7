"""Decoder for the pgoutput logical replication protocol (version 1, with messages).

Pure logic with no I/O, so it is unit-testable on captured bytes. Rows are held
back until Commit: a transaction is only handed on whole, after the server says
it committed. (Protocol 1 does not stream in-progress transactions: the server
spills large ones to disk and sends them at commit, so there is nothing to
abort.) Reference: PostgreSQL docs, "Logical Replication Message Formats".

Memory is bounded by configuration, not by input: past ``max_changes`` rows or
``max_bytes`` of row messages in one transaction, the decoder stops keeping rows
and only counts them per table (``Transaction.touched``). The planner turns such
a *degraded* transaction into table-wide invalidations at its commit version.

Given ``reads`` (the Postgres source passes :meth:`cdcd.rules.Rules.reads`), rows hold only the
columns the rules read; the others are walked but neither decoded nor converted
(docs/decode-what-rules-read.md).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from cdcd.change import ALL_COLUMNS, UNAVAILABLE, Change, Invalidation, Op, Reads, Rejected, Transaction
from cdcd.keys import check_name
from cdcd.pg.lsn import lsn_to_str as lsn_to_str  # re-exported: LSN helpers live in cdcd.pg.lsn
from cdcd.pg.lsn import str_to_lsn as str_to_lsn
from cdcd.pg.pgtypes import converter

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
MESSAGE_PREFIX = "cdcd"
MAX_TRANSACTION_CHANGES = 20_000
MAX_TRANSACTION_BYTES = 8 * 1024 * 1024

log = structlog.get_logger("cdcd.source.pgoutput")

_I8 = struct.Struct("!b")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct("!bQQq")  # flags, commit LSN, end LSN, commit time
_I16_FROM = _I16.unpack_from
_I32_FROM = _I32.unpack_from
_U32_FROM = _U32.unpack_from


class DecodeError(ValueError):
    """The byte stream is not valid pgoutput: the replication session must be restarted."""


@dataclass(slots=True)
class Column:
    name: str
    type_oid: int
    is_key: bool


@dataclass(slots=True)
class Relation:
    oid: int
    schema: str
    table: str
    replica_identity: str  # 'd' default, 'f' full, 'i' index, 'n' nothing
    columns: list[Column]
    converters: list[Any] = field(default_factory=list)
    # hot-path views of ``columns`` (the tuple decoder reads these, not the Column objects)
    names: tuple[str, ...] = ()
    keyflags: tuple[bool, ...] = ()
    # the names to decode in a new / old tuple: None where the consumer does not read the column (skipped)
    new_names: tuple[str | None, ...] = ()
    old_names: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            self.names = tuple(c.name for c in self.columns)
            self.keyflags = tuple(c.is_key for c in self.columns)
        if not self.converters:
            self.converters = [converter(c.type_oid) for c in self.columns]
        if not self.new_names:
            self.read(ALL_COLUMNS)

    def read(self, reads: Reads) -> None:
        """Decode only the columns ``reads`` names (all where it says None)."""
        self.new_names = tuple(n if reads.new is None or n in reads.new else None for n in self.names)
        self.old_names = tuple(n if reads.old is None or n in reads.old else None for n in self.names)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> str:
        b = self.buf[self.pos:self.pos + 1]
        if not b:
            raise DecodeError("unexpected end of message")
        self.pos += 1
        return chr(b[0])

    def _unpack(self, s: struct.Struct) -> int:
        try:
            (v,) = s.unpack_from(self.buf, self.pos)
        except struct.error as exc:
            raise DecodeError(f"truncated message: {exc}") from exc
        self.pos += s.size
        return int(v)

    def i8(self) -> int:
        return self._unpack(_I8)

    def i16(self) -> int:
        return self._unpack(_I16)

    def i32(self) -> int:
        return self._unpack(_I32)

    def u32(self) -> int:
        return self._unpack(_U32)

    def i64(self) -> int:
        return self._unpack(_I64)

    def u64(self) -> int:
        return self._unpack(_U64)

    def cstr(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError("unterminated string")
        s = self.buf[self.pos:end].decode()
        self.pos = end + 1
        return s

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError("length runs past the end of the message")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b


def _ts(micros: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=micros)


class PgOutputDecoder:
    """Feeds on pgoutput payloads; returns a Transaction at each Commit.

    Relation metadata arrives before the first row of a table in each session
    and again after a schema change, so the cache here is per connection: make a
    new decoder for every replication session.
    """

    def __init__(self, origin: str = "pg", max_changes: int = MAX_TRANSACTION_CHANGES,
                 max_bytes: int = MAX_TRANSACTION_BYTES) -> None:
        self.origin = origin
        self.max_changes = max_changes
        self.max_bytes = max_bytes
        self.relations: dict[int, Relation] = {}
        self._txn: Transaction | None = None
        self._txn_bytes = 0  # row message bytes of the open transaction, for max_bytes
        self._bad_messages: list[str] = []
        self._toast = False  # set by _tuple when a decoded column was an unchanged TOAST value
        self.on_relation: Callable[[Relation], None] | None = None  # the schema guard listens here
        # What the consumer reads of a table's rows, by (schema, table) as the changes will name it; None: all
        # columns of every table (see Reads). Asked once per Relation message, so a schema change re-asks.
        self.reads: Callable[[str, str], Reads] | None = None

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    @property
    def buffered(self) -> int:
        """Row changes held for the open transaction (bounded by ``max_changes``)."""
        return len(self._txn.changes) if self._txn is not None else 0

    def feed(self, payload: bytes, lsn: int = 0) -> Transaction | Rejected | None:
        first = payload[0] if payload else 0
        if first == 73 or first == 85 or first == 68:  # I U D: the hot path
            self._row(first, payload)
            return None
        r = _Reader(payload)
        kind = r.byte()
        if kind == "B":
            try:
                final_lsn, _commit_ts, xid = _BEGIN.unpack_from(payload, 1)
            except struct.error as exc:
                raise DecodeError(f"truncated message: {exc}") from None
            # the commit time is taken from Commit (one datetime per transaction, not two)
            self._txn = Transaction(version=final_lsn, changes=[], position=None, commit_time=None, xid=xid,
                                    origin=self.origin)
            self._txn_bytes = 0
            return None
        if kind == "C":
            try:
                _flags, commit_lsn, end_lsn, commit_ts = _COMMIT.unpack_from(payload, 1)
            except struct.error as exc:
                raise DecodeError(f"truncated message: {exc}") from None
            txn = self._txn
            self._txn = None
            if txn is None:
                raise DecodeError(f"Commit at {lsn_to_str(commit_lsn)} without Begin")
            txn.version = commit_lsn
            txn.position = end_lsn
            txn.commit_time = _ts(commit_ts)
            if txn.touched is not None:
                log.warning("transaction_degraded", xid=txn.xid, version=lsn_to_str(commit_lsn),
                            changes=sum(txn.touched.values()),
                            tables=sorted(f"{s}.{t}" for s, t in txn.touched),
                            detail="committed; every entry derived from these tables is invalidated at once")
            return txn
        if kind == "R":
            self._relation(r)
            return None
        if kind == "T":
            n = r.i32()
            r.i8()  # options: cascade / restart identity, irrelevant to caches
            txn = self._current()
            for _ in range(n):
                rel = self._rel(r.u32())
                if txn.touched is not None:  # degraded: a truncate is table-wide already
                    key = (rel.schema, rel.table)
                    txn.touched[key] = txn.touched.get(key, 0) + 1
                else:
                    txn.changes.append(Change(Op.TRUNCATE, rel.schema, rel.table))
            return None
        if kind == "M":
            return self._message(r, lsn)
        if kind in "YO":  # Type, Origin: nothing a cache needs
            return None
        raise DecodeError(f"unknown pgoutput message type {kind!r}")

    def _current(self) -> Transaction:
        if self._txn is None:
            raise DecodeError("row change outside a transaction")
        return self._txn

    def _rel(self, oid: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"change for relation {oid} before its Relation message") from None

    def _relation(self, r: _Reader) -> None:
        oid = r.u32()
        schema = r.cstr() or "pg_catalog"
        table = r.cstr()
        ident = r.byte()
        cols = []
        for _ in range(r.i16()):
            flags = r.i8()
            name = r.cstr()
            type_oid = r.u32()
            r.i32()  # atttypmod
            cols.append(Column(name, type_oid, bool(flags & 1)))
        rel = self.relations[oid] = Relation(oid, schema, table, ident, cols)
        if self.reads is not None:
            rel.read(self.reads(schema, table))
        if self.on_relation is not None:
            self.on_relation(rel)

    def _tuple(self, buf: bytes, pos: int, rel: Relation, names: tuple[str | None, ...],
               key_only: bool = False) -> tuple[dict[str, Any], int]:
        """The row at ``pos`` and the position after it; columns whose name in ``names`` is None are skipped."""
        # The hot loop of the whole daemon: one iteration per column of every row change. It reads the
        # buffer directly (no per-field method calls); a read past the end raises IndexError or
        # struct.error, turned into DecodeError below, and every length is checked before slicing,
        # skipped columns included (so a malformed message is refused whatever the rules read).
        end = len(buf)
        row: dict[str, Any] = {}
        try:
            n = _I16_FROM(buf, pos)[0]
            pos += 2
            if n != len(names):
                raise DecodeError(f"{rel.schema}.{rel.table}: tuple has {n} columns, relation has {len(names)}")
            for name, conv, is_key in zip(names, rel.converters, rel.keyflags, strict=True):
                kind = buf[pos]
                if kind == 116:  # 't': text value
                    size = _I32_FROM(buf, pos + 1)[0]
                    pos += 5
                    stop = pos + size
                    if stop > end or size < 0:
                        raise DecodeError("length runs past the end of the message")
                    if name is None:  # not read: neither decoded nor converted
                        pos = stop
                        continue
                    text = buf[pos:stop].decode()
                    pos = stop
                    if conv is None:
                        row[name] = text
                    else:
                        try:
                            row[name] = conv(text)
                        except (ValueError, ArithmeticError):
                            row[name] = text
                elif kind == 110:  # 'n': null
                    pos += 1
                    if name is not None:
                        # In a 'K' (old key) tuple, non-key columns are sent as null: unknown, not NULL.
                        row[name] = UNAVAILABLE if key_only and not is_key else None
                elif kind == 117:  # 'u': unchanged TOASTed value, not sent
                    pos += 1
                    if name is not None:
                        row[name] = UNAVAILABLE
                        self._toast = True
                elif kind == 98:  # 'b': binary value
                    size = _I32_FROM(buf, pos + 1)[0]
                    pos += 5
                    stop = pos + size
                    if stop > end or size < 0:
                        raise DecodeError("length runs past the end of the message")
                    if name is not None:
                        row[name] = buf[pos:stop]
                    pos = stop
                else:
                    raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
        except IndexError:
            raise DecodeError("unexpected end of message") from None
        except struct.error as exc:
            raise DecodeError(f"truncated message: {exc}") from None
        return row, pos

    def _row(self, kind: int, buf: bytes) -> None:
        try:
            oid = _U32_FROM(buf, 1)[0]
            tag = buf[5]
        except (IndexError, struct.error):
            raise DecodeError("unexpected end of message") from None
        rel = self.relations.get(oid)
        if rel is None:
            raise DecodeError(f"change for relation {oid} before its Relation message")
        txn = self._txn
        if txn is None:
            raise DecodeError("row change outside a transaction")
        touched = txn.touched
        if touched is None:
            self._txn_bytes += len(buf)
            if len(txn.changes) >= self.max_changes or self._txn_bytes > self.max_bytes:
                touched = self._degrade(txn)
        if touched is None:
            try:
                self._decode_row(kind, tag, buf, rel, txn)
                return
            except UnicodeDecodeError as exc:
                # A column the rules read is not valid UTF-8 (a SQL_ASCII database): no key or value can be
                # rendered faithfully, and a skipped change would leave stale entries. The transaction
                # falls back to table-wide invalidation of everything it touched, this table included.
                touched = self._degrade(txn, f"{rel.schema}.{rel.table}: a column value is not valid UTF-8 "
                                             f"({exc.reason} at byte {exc.start})")
        # Degraded: O(1) per table, whatever the number of rows. The row is not decoded at all.
        key = (rel.schema, rel.table)
        touched[key] = touched.get(key, 0) + 1

    def _decode_row(self, kind: int, tag: int, buf: bytes, rel: Relation, txn: Transaction) -> None:
        if kind == 73:  # I
            if tag != 78:  # 'N'
                raise DecodeError("Insert without new tuple")
            txn.changes.append(Change(Op.INSERT, rel.schema, rel.table, None,
                                      self._tuple(buf, 6, rel, rel.new_names)[0]))
            return
        if kind == 68:  # D
            txn.changes.append(Change(Op.DELETE, rel.schema, rel.table,
                                      self._tuple(buf, 6, rel, rel.old_names, tag == 75)[0], None))
            return
        before: dict[str, Any] | None = None
        pos = 6
        key_only = tag == 75
        if key_only or tag == 79:  # K old key, O old row
            before, pos = self._tuple(buf, 6, rel, rel.old_names, key_only)
            if pos >= len(buf):
                raise DecodeError("unexpected end of message")
            tag = buf[pos]
            pos += 1
        if tag != 78:
            raise DecodeError("Update without new tuple")
        self._toast = False
        after = self._tuple(buf, pos, rel, rel.new_names)[0]
        if before is not None and self._toast:
            if rel.old_names != rel.new_names:
                # The old row was decoded for the key columns only: decode it again with every column
                # the new row keeps, so the unchanged TOAST values can be taken from it (rare: TOAST only).
                before = self._tuple(buf, 6, rel, rel.new_names, key_only)[0]
            # Unchanged TOAST columns are absent from the new tuple but present in a full old one.
            for name, value in after.items():
                if value is UNAVAILABLE and before.get(name, UNAVAILABLE) is not UNAVAILABLE:
                    after[name] = before[name]
        txn.changes.append(Change(Op.UPDATE, rel.schema, rel.table, before, after))

    def _degrade(self, txn: Transaction, why: str = "") -> dict[tuple[str, str], int]:
        """Past a cap (or at a row that cannot be decoded): drop the rows held so far, keep only how many
        changed per table."""
        touched: dict[tuple[str, str], int] = dict(Counter((c.schema, c.table) for c in txn.changes))
        txn.touched = touched
        txn.changes = []
        if why:
            log.error("transaction_degrading", xid=txn.xid, final_lsn=lsn_to_str(txn.version), reason=why,
                      detail="a row cannot be decoded: at commit every entry derived from the tables the "
                             "transaction touched is invalidated")
        else:
            log.warning("transaction_degrading", xid=txn.xid, final_lsn=lsn_to_str(txn.version),
                        max_changes=self.max_changes, max_bytes=self.max_bytes, buffered_bytes=self._txn_bytes,
                        detail="transaction exceeds source.max_transaction_changes/bytes: its rows are no "
                               "longer kept; at commit every entry derived from the tables it touched is "
                               "invalidated")
        return touched

    def _message(self, r: _Reader, lsn: int) -> Transaction | Rejected | None:
        transactional = bool(r.i8() & 1)
        msg_lsn = r.u64()
        prefix = r.cstr()
        content = r.take(r.i32())
        if prefix != MESSAGE_PREFIX:
            return None  # another application's message
        try:
            inv = parse_invalidation(content)
        except ValueError as exc:
            return Rejected(f"malformed cdcd message: {exc}", position=msg_lsn, raw=content, origin=self.origin)
        if transactional:
            self._current().invalidations.append(inv)
            return None
        return Transaction(version=msg_lsn, changes=[], position=msg_lsn, invalidations=[inv], origin=self.origin)


def parse_invalidation(content: bytes | str) -> Invalidation:
    """``{"keys": [...], "tags": [...]}`` -> Invalidation; ValueError on anything else."""
    try:
        obj = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not set(obj) <= {"keys", "tags"}:
        raise ValueError('expected an object with "keys" and/or "tags"')
    keys, tags = obj.get("keys", []), obj.get("tags", [])
    if not all(isinstance(x, list) and all(isinstance(i, str) for i in x) for x in (keys, tags)):
        raise ValueError('"keys" and "tags" must be lists of strings')
    for name in (*keys, *tags):
        check_name(name, "name")  # a message may not address cdcd's own keys: dead-lettered
    return Invalidation(keys=list(keys), tags=list(tags))
