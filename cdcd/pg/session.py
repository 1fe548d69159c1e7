"""One definition of the Postgres session settings behind every value cdcd reads.

Keys and projections are rendered from the text form of column values, and that
text depends on session settings: a ``timestamptz`` prints in the session's
``TimeZone``, dates follow ``DateStyle``, floats ``extra_float_digits``, bytea
``bytea_output``, intervals ``IntervalStyle``. The replication stream (the
daemon), ``cdcd warm`` and ``cdcd inspect`` must therefore read with the same
settings, or the same row renders two different keys (a non-UTC server once made
warm write keys the daemon never touched). ``cdcd.pg.pgtypes`` parses
exactly these formats.

The settings are sent as libpq ``options`` at connection time (they are in force
before the first statement, also on a replication connection, where ``SET`` is
not available for walsender output), merged with any ``options`` the user's DSN
already carries; ours come last, so they win.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# The formats pgtypes parses. Order is irrelevant; values must not contain spaces.
SETTINGS: dict[str, str] = {
    "DateStyle": "ISO,MDY",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}

# Text arrives as UTF-8 whatever the server's encoding (LATIN1 is converted; psycopg would otherwise
# hand out bytes on a SQL_ASCII server). The one exception is the replication stream of a SQL_ASCII
# server: there the walsender would fail its own conversion on any byte that is not UTF-8 and break the
# stream at that change forever, so that stream is read as it is stored (SQL_ASCII: no conversion) and
# a value that is not UTF-8 degrades its transaction to table-wide invalidation in the decoder.
CLIENT_ENCODING = "UTF8"


def stream_encoding(server_encoding: str) -> str:
    """The client_encoding for a replication connection to a server with ``server_encoding``."""
    return "SQL_ASCII" if server_encoding.upper() == "SQL_ASCII" else CLIENT_ENCODING


def options(read_only: bool = False, encoding: str = CLIENT_ENCODING) -> str:
    """The libpq ``options`` string (``-c name=value ...``) that pins :data:`SETTINGS`."""
    items = {**SETTINGS, "client_encoding": encoding}
    if read_only:
        items["default_transaction_read_only"] = "on"
    return " ".join(f"-c {k}={v}" for k, v in items.items())


def conninfo(dsn: str, read_only: bool = False, encoding: str = CLIENT_ENCODING) -> str:
    """``dsn`` (libpq keywords or URL) with the session settings added to its ``options``.

    Works for psycopg 3 and psycopg2 alike (both accept the resulting keyword string).
    """
    params = conninfo_to_dict(dsn)
    existing = str(params.get("options") or "").strip()
    ours = options(read_only, encoding)
    return make_conninfo(dsn, options=f"{existing} {ours}" if existing else ours)


def apply(conn: psycopg.Connection[Any]) -> None:
    """Pin :data:`SETTINGS` on an already open connection (for one the caller did not open itself)."""
    for name, value in SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
