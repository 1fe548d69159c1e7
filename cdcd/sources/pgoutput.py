"""Decoder for the pgoutput logical replication protocol (version 1, with messages).

Pure logic with no I/O, so it is unit-testable on captured bytes. Rows are held
back until Commit: a transaction is only handed on whole, after the server says
it committed. (Protocol 1 does not stream in-progress transactions: the server
spills large ones to disk and sends them at commit, so there is nothing to
abort.) Reference: PostgreSQL docs, "Logical Replication Message Formats".
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cdcd.change import UNAVAILABLE, Change, Invalidation, Op, Rejected, Transaction
from cdcd.sources.pgtypes import converter

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
MESSAGE_PREFIX = "cdcd"

_I8 = struct.Struct("!b")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")


class DecodeError(ValueError):
    """The byte stream is not valid pgoutput: the replication session must be restarted."""


def lsn_to_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


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

    def __init__(self, origin: str = "pg") -> None:
        self.origin = origin
        self.relations: dict[int, Relation] = {}
        self._txn: Transaction | None = None
        self._bad_messages: list[str] = []

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    def feed(self, payload: bytes, lsn: int = 0) -> Transaction | Rejected | None:
        r = _Reader(payload)
        kind = r.byte()
        if kind == "B":
            final_lsn = r.u64()
            commit_ts = r.i64()
            xid = r.u32()
            self._txn = Transaction(version=final_lsn, changes=[], position=None, commit_time=_ts(commit_ts),
                                    xid=xid, origin=self.origin)
            return None
        if kind == "C":
            r.i8()  # flags, unused
            commit_lsn = r.u64()
            end_lsn = r.u64()
            commit_ts = r.i64()
            txn = self._txn
            self._txn = None
            if txn is None:
                raise DecodeError(f"Commit at {lsn_to_str(commit_lsn)} without Begin")
            txn.version = commit_lsn
            txn.position = end_lsn
            txn.commit_time = _ts(commit_ts)
            return txn
        if kind == "R":
            self._relation(r)
            return None
        if kind in "IUD":
            self._row(kind, r)
            return None
        if kind == "T":
            n = r.i32()
            r.i8()  # options: cascade / restart identity, irrelevant to caches
            for _ in range(n):
                rel = self._rel(r.u32())
                self._current().changes.append(Change(Op.TRUNCATE, rel.schema, rel.table))
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
        self.relations[oid] = Relation(oid, schema, table, ident, cols, [converter(c.type_oid) for c in cols])

    def _tuple(self, r: _Reader, rel: Relation, key_only: bool = False) -> dict[str, Any]:
        n = r.i16()
        if n != len(rel.columns):
            raise DecodeError(f"{rel.schema}.{rel.table}: tuple has {n} columns, relation has {len(rel.columns)}")
        row: dict[str, Any] = {}
        for col, conv in zip(rel.columns, rel.converters, strict=True):
            kind = r.byte()
            if kind == "n":
                # In a 'K' (old key) tuple, non-key columns are sent as null: they are unknown, not NULL.
                row[col.name] = UNAVAILABLE if key_only and not col.is_key else None
            elif kind == "u":
                row[col.name] = UNAVAILABLE  # unchanged TOASTed value: not sent
            elif kind == "t":
                text = r.take(r.i32()).decode()
                if conv is None:
                    row[col.name] = text
                else:
                    try:
                        row[col.name] = conv(text)
                    except (ValueError, ArithmeticError):
                        row[col.name] = text
            elif kind == "b":
                row[col.name] = r.take(r.i32())
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
        return row

    def _row(self, kind: str, r: _Reader) -> None:
        rel = self._rel(r.u32())
        txn = self._current()
        if kind == "I":
            if r.byte() != "N":
                raise DecodeError("Insert without new tuple")
            txn.changes.append(Change(Op.INSERT, rel.schema, rel.table, None, self._tuple(r, rel)))
            return
        if kind == "D":
            tag = r.byte()
            txn.changes.append(Change(Op.DELETE, rel.schema, rel.table, self._tuple(r, rel, tag == "K"), None))
            return
        before: dict[str, Any] | None = None
        tag = r.byte()
        if tag in "KO":
            before = self._tuple(r, rel, key_only=(tag == "K"))
            tag = r.byte()
        if tag != "N":
            raise DecodeError("Update without new tuple")
        after = self._tuple(r, rel)
        if before is not None:
            # Unchanged TOAST columns are absent from the new tuple but present in a full old one.
            for name, value in after.items():
                if value is UNAVAILABLE and before.get(name, UNAVAILABLE) is not UNAVAILABLE:
                    after[name] = before[name]
        txn.changes.append(Change(Op.UPDATE, rel.schema, rel.table, before, after))

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
    return Invalidation(keys=list(keys), tags=list(tags))
