"""The inspector's Postgres side: rows read exactly as the daemon would have rendered them, and WAL positions.

Rows are read as *text* (the column output functions) on a session with the replication
stream's settings (:mod:`cdcd.pg.session`) and converted by the decoder's own converters
(:func:`cdcd.pg.pgtypes.convert`), so a fresh entry compares equal whatever the column
types. The session is read-only; the heartbeat (one WAL record, on a connection of its own) is
the inspector's only write.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cdcd.inspect.model import DbRow, Table, ident
from cdcd.pg.pgtypes import convert
from cdcd.ratelimit import TokenBucket

if TYPE_CHECKING:  # imported where used: ``cdcd --help`` must not pay for psycopg and pydantic
    import psycopg

    from cdcd.keys import Template
    from cdcd.rules import Rules

HEARTBEAT = '{"keys":[],"tags":[]}'
_JSON = 114


class RowReader:
    def __init__(self, conninfo: str, bucket: TokenBucket, page: int,
                 conn: psycopg.Connection[Any] | None = None) -> None:
        """``conn``: read through this session instead (``cdcd warm --hot`` passes its snapshot's; it must
        have the replication session's settings, and a failed lookup must be rolled back by the caller)."""
        import psycopg

        from cdcd.pg import session

        self.conninfo = conninfo  # password and TLS settings merged in
        self.bucket = bucket
        self.page = page
        self.commit_timestamps = False
        # The replication session's text formats (cdcd.pg.session): rows read here must convert to
        # exactly the values the pgoutput decoder produced from the same data.
        self.pg: psycopg.Connection[Any] = conn if conn is not None else psycopg.connect(
            session.conninfo(conninfo, read_only=True), autocommit=True, connect_timeout=5,
            application_name="cdcd-inspect")

    def close(self) -> None:
        self.pg.close()

    # -------------------------------------------------------------- setup

    def check_commit_timestamps(self) -> bool:
        row = self.pg.execute("SHOW track_commit_timestamp").fetchone()
        self.commit_timestamps = bool(row and row[0] == "on")
        return self.commit_timestamps

    def now(self) -> float | None:
        """The Postgres clock (unix seconds)."""
        row = self.pg.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        return float(row[0]) if row else None

    def tables(self, rules: Rules) -> tuple[dict[str, Table], list[str], list[str]]:
        """The rules' tables as the catalog shows them: (tables, schema errors, notes on skipped tables)."""
        from cdcd.pg import catalog

        tables: dict[str, Table] = {}
        errors: list[str] = []
        notes: list[str] = []
        for rel, rule in rules.by_relation.items():
            info = catalog.table_by_name(self.pg, rel)
            if info is None:
                notes.append(f"{rel}: table does not exist; skipped")
                continue
            errors.extend(catalog.rule_errors(rel, rules.source[rel], info))
            tables[rel] = Table(rel, rule, list(info.replicated), catalog.primary_key(self.pg, info.oid),
                                info.reltuples)
        return tables, errors, notes

    # -------------------------------------------------------------- rows

    def _select_list(self, t: Table) -> str:
        ts = "extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8" if self.commit_timestamps \
            else "NULL::float8"
        return "ctid::text, xmin::text, " + ts + ", " + ", ".join(ident(c.name) for c in t.columns)

    def _rows(self, t: Table, query: str, params: Sequence[Any] = ()) -> list[DbRow]:
        """Rows as raw text (column output functions), converted exactly like the pgoutput decoder does."""
        cur = self.pg.execute(query, list(params))
        res = cur.pgresult
        out: list[DbRow] = []
        if res is None:
            return out
        cols = t.columns
        for i in range(res.ntuples):
            raw: dict[str, str | None] = {}
            values: dict[str, Any] = {}
            for j, c in enumerate(cols, start=3):
                b = res.get_value(i, j)
                text = b.decode() if b is not None else None
                raw[c.name] = text
                values[c.name] = None if text is None else convert(c.type_oid, text)
            committed = res.get_value(i, 2)
            out.append(DbRow(ctid=(res.get_value(i, 0) or b"").decode(), xmin=(res.get_value(i, 1) or b"").decode(),
                             committed=float(committed) if committed is not None else None, raw=raw, values=values))
        return out

    def lsn(self) -> int:
        """The WAL *insert* position (replay position on a standby): every commit visible now is before it."""
        row = self.pg.execute(
            "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_insert_lsn() END, '0/0')::text").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def sample(self, t: Table, n: int) -> list[DbRow]:
        sel = self._select_list(t)
        if t.reltuples > 100_000:
            pct = min(100.0, 200.0 * n / t.reltuples)  # whole blocks: cheap on big tables, oversampled 2x
            q = f"SELECT {sel} FROM {t.quoted} TABLESAMPLE SYSTEM ({pct:.6f}) ORDER BY random() LIMIT {int(n)}"
        elif t.reltuples > 5 * n:
            pct = min(100.0, 200.0 * n / t.reltuples)
            q = f"SELECT {sel} FROM {t.quoted} TABLESAMPLE BERNOULLI ({pct:.6f}) ORDER BY random() LIMIT {int(n)}"
        else:  # small or never analyzed (reltuples -1): a scan with a top-N sort
            q = f"SELECT {sel} FROM {t.quoted} ORDER BY random() LIMIT {int(n)}"
        return self._rows(t, q)

    def pages(self, t: Table) -> Iterator[list[DbRow]]:
        """Every row, in pages: keyset on the primary key, else block ranges (never one long snapshot)."""
        sel = self._select_list(t)
        if t.pk:
            pk_cols = [t.col(c) for c in t.pk]
            order = ", ".join(ident(c) for c in t.pk)
            last: list[str | None] | None = None
            while True:
                self.bucket.take(self.page)
                if last is None:
                    rows = self._rows(t, f"SELECT {sel} FROM {t.quoted} ORDER BY {order} LIMIT {self.page}")
                else:
                    cond = "(" + order + ") > (" + ", ".join(
                        f"%s::{c.type_name}" for c in pk_cols if c is not None) + ")"
                    rows = self._rows(t, f"SELECT {sel} FROM {t.quoted} WHERE {cond} ORDER BY {order} "
                                         f"LIMIT {self.page}", last)
                if not rows:
                    return
                yield rows
                last = [rows[-1].raw[c] for c in t.pk]
        else:
            block = 0
            step = 64
            while True:
                size = self.pg.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
                                       (t.quoted.replace("%%", "%"),)).fetchone()
                if size is None or block >= int(size[0]):
                    return
                rows = self._rows(t, f"SELECT {sel} FROM {t.quoted} WHERE ctid >= '({block},0)'::tid "
                                     f"AND ctid < '({block + step},0)'::tid")
                block += step
                if rows:
                    self.bucket.take(len(rows))
                    yield rows

    def reread(self, t: Table, rows: Sequence[DbRow]) -> list[DbRow] | None:
        """The same rows (by primary key) as they are now, in one query; None for a table without one.

        ``inspect --watch`` reads a sample's entries between two reads of its rows, so it knows
        whether a row changed around the moment its entry was read.
        """
        if not t.pk or not rows:
            return [] if t.pk else None
        cols = [t.col(c) for c in t.pk]
        if any(c is None for c in cols):
            return None
        one = "(" + ", ".join(f"%s::{c.type_name}" for c in cols if c is not None) + ")"
        params = [r.raw[c] for r in rows for c in t.pk]
        key = "(" + ", ".join(ident(c) for c in t.pk) + ")"
        return self._rows(t, f"SELECT {self._select_list(t)} FROM {t.quoted} WHERE {key} IN "
                             f"({', '.join([one] * len(rows))})", params)

    def lookup(self, t: Table, template: Template, values: dict[str, str], bare: str) -> list[DbRow] | None:
        """Rows whose ``template`` renders the key ``bare`` (without prefix); None when they cannot be looked up."""
        import psycopg

        conds, params = [], []
        for col, text in values.items():
            c = t.col(col)
            if c is None:
                return None
            if c.type_oid == _JSON:
                conds.append(f"{ident(col)}::jsonb = %s::jsonb")
            else:
                conds.append(f"{ident(col)} = %s::{c.type_name}")
            params.append(text)
        try:
            rows = self._rows(t, f"SELECT {self._select_list(t)} FROM {t.quoted} WHERE {' AND '.join(conds)}",
                              params)
        except psycopg.Error:
            return None  # e.g. 'email:x' is not a bigint: this template does not produce this key
        return [r for r in rows if template.render(r.values) == bare]

    def emit_heartbeat(self) -> str | None:
        """One empty cdcd message (one WAL record) that moves an idle daemon's version; the error, if it failed."""
        import psycopg

        try:
            with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5,
                                 application_name="cdcd-inspect-heartbeat") as conn:
                conn.execute("SELECT pg_logical_emit_message(false, 'cdcd', %s)", (HEARTBEAT,))
        except psycopg.Error as exc:
            return str(exc).strip()
        return None
