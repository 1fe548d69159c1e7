"""Key -> row: which tables' templates render a cache key, and the column texts to look its rows up by.

Shared by the inspector's keyspace scan and ``cdcd warm --hot`` (both start from a key and need its
row). The templates are the daemon's own (:meth:`cdcd.keys.Template.match`, unescaped values), so a
key matches exactly when some row could render it; the values are *text* as the key carries it, turned
into the form ``RowReader.lookup`` casts back to the column's type (``bytea`` keys carry hex without the
``\\x`` of the type's input syntax).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdcd.inspect.model import Table
    from cdcd.keys import Template

_BYTEA = 17


def match_key(tables: Iterable[Table], bare: str) -> list[tuple[Table, Template, dict[str, str]]]:
    """Every (table, template, column texts) that can render ``bare`` (the key without the keyspace prefix)."""
    out = []
    for t in tables:
        for tpl in t.rule.keys:
            values = tpl.match(bare)
            if values is None:
                continue
            for col, text in values.items():
                c = t.col(col)
                if c is not None and c.type_oid == _BYTEA:
                    values[col] = "\\x" + text
            out.append((t, tpl, values))
    return out
