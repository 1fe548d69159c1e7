"""Explicit invalidations from application code, inside the application's own transaction.

Rules map table rows to keys and tags, but some cached things have no row the rules can see: a
computed view, a denormalised report, a value derived from an external side effect. For those the
application writes ``pg_logical_emit_message(true, 'cdcd', '{"keys": [...], "tags": [...]}')`` in the
same transaction as its change. The message travels in the WAL with the transaction, so the daemon
applies it at that transaction's commit version, exactly like a row change: it is atomic with the
commit (a rollback emits nothing), it is never applied before the data it describes is visible, and
it obeys the same versioned compare-and-set as every other write (docs/explicit-invalidations.md).

:func:`emit_invalidation` builds that statement once and runs it through whatever database handle
the application already holds (psycopg 3, psycopg2, SQLAlchemy, Django), so the JSON, the prefix and
the ``transactional=true`` flag are never hand-written. Names are checked here with the same rule the
daemon applies (:func:`cdcd.keys.check_name`), so a bad name fails in the application, at the call,
instead of becoming a dead letter in the daemon later.

This module needs no driver at import time: it looks at the handle's type to pick the call.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from typing import Any

from cdcd.keys import check_name

from .dbapi import execute, is_async, name

PREFIX = "cdcd"  # the logical message prefix the daemon consumes (pgoutput ``messages``, Debezium op ``m``)
SQL = "SELECT pg_logical_emit_message(true, 'cdcd', %s)"


def invalidation_message(keys: Iterable[str] = (), tags: Iterable[str] = ()) -> str:
    """The message body the daemon parses: ``{"keys": [...], "tags": [...]}``.

    Keys and tags are logical names, without the keyspace prefix, as the application passes them
    to ``Cache.get``/``Cache.invalidate_tag`` (``user:42``, ``tenant:7``).
    """
    key_list = [check_name(_text(k, "key"), "key") for k in _names(keys, "keys")]
    tag_list = [check_name(_text(t, "tag"), "tag") for t in _names(tags, "tags")]
    if not key_list and not tag_list:
        raise ValueError("an invalidation needs at least one key or tag")
    return json.dumps({"keys": key_list, "tags": tag_list}, separators=(",", ":"), ensure_ascii=False)


def emit_invalidation(handle: Any, keys: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
    """Emit an invalidation of ``keys`` and ``tags`` in ``handle``'s current transaction.

    ``handle`` is one of: a psycopg 3 connection or cursor, a psycopg2 connection or cursor, a
    SQLAlchemy ``Connection`` or ``Session`` (any dialect driver on PostgreSQL), a Django database
    connection (``django.db.connection`` or ``connections[alias]``), or any DB-API connection or cursor
    that takes ``%s`` parameters. Call it inside the transaction that makes the change; in autocommit
    mode it is its own transaction, applied at its own commit. Async handles need
    :func:`aemit_invalidation`.
    """
    message = invalidation_message(keys, tags)
    if is_async(handle):
        raise TypeError(f"{name(handle)} is asynchronous: use `await aemit_invalidation(...)`")
    result = execute(handle, SQL, (message,))
    if inspect.isawaitable(result):  # an async handle of a library not known above
        if inspect.iscoroutine(result):
            result.close()  # never silently drop an invalidation: the statement did not run
        raise TypeError(f"{name(handle)} is asynchronous: use `await aemit_invalidation(...)`")


async def aemit_invalidation(handle: Any, keys: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
    """:func:`emit_invalidation` for asyncio handles: psycopg 3 ``AsyncConnection``/``AsyncCursor`` and
    SQLAlchemy ``AsyncConnection``/``AsyncSession``."""
    message = invalidation_message(keys, tags)
    if not is_async(handle):  # checked before running: a sync handle would execute here, unawaited
        raise TypeError(f"{name(handle)} is synchronous, or not a psycopg 3 / SQLAlchemy asyncio handle: "
                        "use emit_invalidation(...)")
    await execute(handle, SQL, (message,))


def _names(values: Iterable[str], what: str) -> Iterable[Any]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a list of names, not a single {type(values).__name__}")
    return values


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} {value!r}: names are str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"empty {what} name")
    return value
