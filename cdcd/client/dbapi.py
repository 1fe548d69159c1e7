"""Running one statement through whatever database handle the application holds.

The helpers that must run inside the application's own transaction (explicit invalidations) or on its
own connection (commit positions for read-your-writes) accept psycopg 3, psycopg2, SQLAlchemy and
Django handles and plain DB-API connections or cursors. This module is the one place that tells them
apart, by type, without importing any driver until a handle of it is passed.
"""

from __future__ import annotations

from typing import Any


def name(handle: Any) -> str:
    return f"{type(handle).__module__}.{type(handle).__qualname__}"


def is_async(handle: Any) -> bool:
    module = type(handle).__module__
    return (_is_psycopg3(module) or module.startswith("sqlalchemy")) and type(handle).__name__.startswith("Async")


def execute(handle: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """Run ``sql`` (``%s`` placeholders) on ``handle``; returns what the driver returns (a cursor, a
    result, or an awaitable for asyncio handles), None for handles run through a temporary cursor."""
    module = type(handle).__module__
    if module.startswith("sqlalchemy"):
        from sqlalchemy import text  # an app passing a SQLAlchemy handle has SQLAlchemy

        names = {f"cdcd_p{i}": v for i, v in enumerate(params)}
        return handle.execute(text(sql % tuple(f":{n}" for n in names)), names)
    if _is_psycopg3(module):
        return handle.execute(sql, params)  # psycopg 3: connections and cursors both execute
    if callable(getattr(handle, "cursor", None)):
        with handle.cursor() as cur:  # psycopg2 connections, Django connections, DB-API connections
            cur.execute(sql, params)
        return None
    if callable(getattr(handle, "execute", None)):
        return handle.execute(sql, params)  # a DB-API cursor (psycopg2, Django's CursorWrapper)
    raise TypeError(f"cannot execute SQL through a {name(handle)}; pass a psycopg, psycopg2, SQLAlchemy or "
                    "Django connection, or a DB-API cursor")


def fetch_row(handle: Any, sql: str) -> Any:
    """The first row of a read-only ``sql`` run on ``handle``. A psycopg/psycopg2 connection that was idle
    (no transaction) before is left idle after, so reading a position never holds a transaction open."""
    if is_async(handle):
        raise TypeError(f"{name(handle)} is asynchronous: use the async variant")
    module = type(handle).__module__
    if module.startswith("sqlalchemy"):
        from sqlalchemy import text

        return handle.execute(text(sql)).first()
    if _is_psycopg3(module):
        idle = _psycopg3_idle(handle)
        row = handle.execute(sql).fetchone()
        if idle:
            handle.rollback()
        return row
    if callable(getattr(handle, "cursor", None)):
        idle = _psycopg2_idle(handle)
        with handle.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
        if idle:
            handle.rollback()
        return row
    if callable(getattr(handle, "execute", None)):
        handle.execute(sql)
        return handle.fetchone()
    raise TypeError(f"cannot execute SQL through a {name(handle)}")


async def afetch_row(handle: Any, sql: str) -> Any:
    """:func:`fetch_row` for psycopg 3 and SQLAlchemy asyncio handles."""
    if not is_async(handle):
        raise TypeError(f"{name(handle)} is not a psycopg 3 / SQLAlchemy asyncio handle: use the sync variant")
    module = type(handle).__module__
    if module.startswith("sqlalchemy"):
        from sqlalchemy import text

        return (await handle.execute(text(sql))).first()
    idle = _psycopg3_idle(handle)
    row = await (await handle.execute(sql)).fetchone()
    if idle:
        await handle.rollback()
    return row


def _psycopg3_idle(handle: Any) -> bool:
    """A psycopg 3 connection (not a cursor) outside any transaction and not in autocommit."""
    info = getattr(handle, "info", None)
    if info is None or getattr(handle, "autocommit", True):
        return False
    from psycopg import pq

    return bool(info.transaction_status == pq.TransactionStatus.IDLE)


def _psycopg2_idle(handle: Any) -> bool:
    status = getattr(handle, "get_transaction_status", None)
    if status is None or getattr(handle, "autocommit", True) or not type(handle).__module__.startswith("psycopg2"):
        return False
    import psycopg2.extensions

    return bool(status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE)


def _is_psycopg3(module: str) -> bool:
    return module == "psycopg" or module.startswith("psycopg.")
