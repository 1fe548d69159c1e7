"""End to end: Postgres -> the daemon's JSON projection -> the client, typed by a decode hook, and the same type
when the application's loader fills the key instead (issue 10, item 2). Real Postgres, daemon and Redis."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pydantic
import redis
from psycopg.rows import dict_row

from cdcd.client import Cache, CacheOptions, TypedSerializer
from tests.client.support import fields
from tests.helpers import DaemonThread, make_config, wait_until

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2) NOT NULL,
                       opened timestamptz NOT NULL, born date, uid uuid NOT NULL, closed_at timestamptz);
ALTER TABLE accounts REPLICA IDENTITY FULL;
"""


class Account(pydantic.BaseModel):
    id: int
    owner: str
    balance: Decimal
    opened: dt.datetime
    born: dt.date | None
    uid: uuid.UUID
    closed_at: dt.datetime | None


def serializer() -> TypedSerializer:
    return TypedSerializer().register(Account, 64, lambda a: a.model_dump(), Account.model_validate)


def test_daemon_json_and_loader_fills_come_back_as_the_same_type(cfg: dict[str, Any], sql: Any, r: redis.Redis,
                                                                  app_db: str) -> None:
    sql(SCHEMA)
    cfg["tables"]["accounts"] = {"keys": ["acct:{id}"], "action": "update"}
    p = cfg["keyspace"]["prefix"]
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    loads = []

    def load(pk: int) -> Account | None:
        loads.append(pk)
        with psycopg.connect(app_db, row_factory=dict_row) as conn:
            row = conn.execute("SELECT * FROM accounts WHERE id = %s", (pk,)).fetchone()
        return None if row is None else Account.model_validate(row)

    d = DaemonThread(make_config(cfg)).start()
    try:
        sql("INSERT INTO accounts VALUES (1, 'ada', 12.50, '2024-02-29 08:11:12.345678+00', '1815-12-10', %s, NULL)",
            (uid,))
        wait_until(lambda: fields(r, f"{p}acct:1").get("d"), what="projection written")
        assert fields(r, f"{p}acct:1")["s"] == "cdc"
        want = Account(id=1, owner="ada", balance=Decimal("12.50"),
                       opened=dt.datetime(2024, 2, 29, 8, 11, 12, 345678, tzinfo=dt.UTC), born=dt.date(1815, 12, 10),
                       uid=uid, closed_at=None)
        opts = CacheOptions(prefix=p)
        with Cache(cfg["redis"]["url"], opts, serializer=serializer()) as a, \
                Cache(cfg["redis"]["url"], opts, serializer=serializer()) as b:
            # 1. The daemon's JSON (numerics as strings, ISO timestamps), typed by the hook.
            got = a.get_or_load("acct:1", lambda: load(1), decode=Account.model_validate)
            assert type(got) is Account and got == want and loads == []
            assert type(got.balance) is Decimal and got.balance.as_tuple().exponent == -2
            # 2. The key invalidated: the application's loader fills it (typed format), another process reads it.
            assert a.delete("acct:1")
            assert a.get_or_load("acct:1", lambda: load(1), decode=Account.model_validate) == want and loads == [1]
            assert fields(r, f"{p}acct:1")["s"] == "app"
            wait_until(lambda: "acct:1" not in b.l1.data, what="b dropped acct:1")
            got_b = b.get_or_load("acct:1", lambda: load(1), decode=Account.model_validate)
            assert type(got_b) is Account and got_b == want and loads == [1]
            # 3. A change: the daemon's newer projection replaces it; both processes follow with the same type.
            sql("UPDATE accounts SET balance = 99.90, closed_at = '2025-01-01 00:00:00+00' WHERE id = 1")
            changed = want.model_copy(update={"balance": Decimal("99.90"),
                                              "closed_at": dt.datetime(2025, 1, 1, tzinfo=dt.UTC)})
            for c in (a, b):
                wait_until(lambda c=c: c.get_or_load("acct:1", lambda: load(1), decode=Account.model_validate)
                           == changed, what="the update reached both")
                assert type(c.get("acct:1", decode=Account.model_validate)) is Account
            assert loads == [1] and fields(r, f"{p}acct:1")["s"] == "cdc"
    finally:
        d.stop()
