"""Candidates for the client's default value format, measured on the values people cache from a database.

    PYTHONPATH=. .venv/bin/python bench/serializer_bench.py [--rounds 5] [--n 20000]

Candidates (issue 10, item 2): msgpack with extension types (what ``TypedSerializer`` is), tagged
JSON with the stdlib, tagged JSON with orjson (``orjson`` has no object hook, so tags are walked in
Python both ways), msgspec's msgpack (natively fast, but an untyped decode returns a datetime, Decimal,
UUID, tuple or set as str/list: it cannot be the default, shown for reference), pickle (exact and fast,
but unpickling what is in a shared Redis runs arbitrary code: not a default, reference only), and the
old ``JsonSerializer`` (``default=str``: lossy, the baseline).

Values: ``row`` is the client bench's 90-byte row of primitives (the common case: ints, strs, a bool);
``typed`` is a row with a datetime (tz), a date, a Decimal, a UUID and a None; ``list100`` is 100 typed
rows (a query result). For each: µs per dumps, µs per loads, encoded bytes, and whether every value
came back equal and of the same type. Rounds are interleaved across candidates; the median is shown.

Needs: msgpack (client dependency), orjson and msgspec (``pip install orjson msgspec``, bench only).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import decimal
import json
import os
import pickle
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdcd.client.serializers import JsonSerializer
from cdcd.client.typed import TypedSerializer

ROW = {"id": 42, "email": "ada@example.com", "name": "Ada Lovelace", "tenant_id": 7, "active": True}
TYPED = {"id": 42, "email": "ada@example.com", "balance": decimal.Decimal("1234.50"),
         "created": dt.datetime(2024, 2, 29, 8, 11, 12, 345678, tzinfo=dt.UTC), "born": dt.date(1815, 12, 10),
         "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"), "deleted_at": None, "active": True}
VALUES: dict[str, Any] = {"row": ROW, "typed": TYPED, "list100": [dict(TYPED, id=i) for i in range(100)]}


# ---------------------------------------------------------------------------------------------- tagged JSON

def _tag(o: Any) -> Any:
    """JSON-compatible form with ``{"$": kind, "v": ...}`` for every type JSON lacks."""
    t = type(o)
    if t is str or t is bool or t is float or o is None:
        return o
    if t is int:
        return o
    if t is dict:
        if all(type(k) is str for k in o) and "$" not in o:
            return {k: _tag(v) for k, v in o.items()}
        return {"$": "m", "v": [[_tag(k), _tag(v)] for k, v in o.items()]}
    if t is list:
        return [_tag(x) for x in o]
    if t is tuple:
        return {"$": "t", "v": [_tag(x) for x in o]}
    if t is set or t is frozenset:
        return {"$": "s" if t is set else "f", "v": [_tag(x) for x in o]}
    if t is bytes:
        return {"$": "b", "v": base64.b64encode(o).decode()}
    if t is decimal.Decimal:
        return {"$": "D", "v": str(o)}
    if t is dt.datetime:
        return {"$": "dt", "v": o.isoformat()}
    if t is dt.date:
        return {"$": "d", "v": o.isoformat()}
    if t is uuid.UUID:
        return {"$": "u", "v": str(o)}
    raise TypeError(t)


_UNTAG: dict[str, Callable[[Any], Any]] = {
    "m": lambda v: {k: x for k, x in v}, "t": tuple, "s": set, "f": frozenset,
    "b": lambda v: base64.b64decode(v), "D": decimal.Decimal, "dt": dt.datetime.fromisoformat,
    "d": dt.date.fromisoformat, "u": uuid.UUID,
}


def _hook(d: dict[str, Any]) -> Any:
    kind = d.get("$")
    if kind is None or len(d) != 2:
        return d
    if kind == "m":
        return {_freeze(k): x for k, x in d["v"]}
    return _UNTAG[kind](d["v"])


def _freeze(k: Any) -> Any:
    return tuple(k) if type(k) is list else k


def _untag(o: Any) -> Any:
    """orjson has no object hook: walk the decoded document in Python."""
    t = type(o)
    if t is dict:
        kind = o.get("$")
        if kind is not None and len(o) == 2:
            v = o["v"]
            if kind == "m":
                return {_freeze(_untag(k)): _untag(x) for k, x in v}
            if kind in ("t", "s", "f"):
                return _UNTAG[kind](_untag(x) for x in v)
            return _UNTAG[kind](v)
        return {k: _untag(v) for k, v in o.items()}
    if t is list:
        return [_untag(x) for x in o]
    return o


class TaggedJson:
    def dumps(self, value: Any) -> bytes:
        return json.dumps(_tag(value), separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data, object_hook=_hook)


class TaggedOrjson:
    def __init__(self) -> None:
        import orjson

        self._dumps, self._loads = orjson.dumps, orjson.loads

    def dumps(self, value: Any) -> bytes:
        return self._dumps(_tag(value))  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> Any:
        return _untag(self._loads(data))


class Msgspec:
    def __init__(self) -> None:
        import msgspec

        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder()

    def dumps(self, value: Any) -> bytes:
        return self._enc.encode(value)

    def loads(self, data: bytes) -> Any:
        return self._dec.decode(data)


class Pickle:
    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def per_call(fn: Callable[[Any], Any], arg: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(arg)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20_000, help="calls per measurement (list100: n/50)")
    args = ap.parse_args()
    cands: dict[str, Any] = {"msgpack+ext (TypedSerializer)": TypedSerializer(), "tagged JSON (stdlib)": TaggedJson(),
                             "tagged JSON (orjson)": TaggedOrjson(), "msgspec msgpack (untyped: lossy)": Msgspec(),
                             "pickle (unsafe: reference)": Pickle(),
                             "JsonSerializer default=str (old)": JsonSerializer()}
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for vname, value in VALUES.items():
            n = args.n if vname != "list100" else max(1, args.n // 50)
            for cname, ser in cands.items():
                data = ser.dumps(value)
                r = results.setdefault((vname, cname), {"dumps": [], "loads": []})
                r["dumps"].append(per_call(ser.dumps, value, n))
                r["loads"].append(per_call(ser.loads, data, n))
    print(f"python {platform.python_version()} {platform.machine()}, rounds={args.rounds}, n={args.n}; "
          f"load average {os.getloadavg()[0]:.2f} (median µs per call)")
    print(f"{'value':8} {'candidate':34} {'dumps µs':>9} {'loads µs':>9} {'bytes':>6}  exact types")
    for vname, value in VALUES.items():
        for cname, ser in cands.items():
            r = results[(vname, cname)]
            data = ser.dumps(value)
            exact = _same(value, ser.loads(data))
            print(f"{vname:8} {cname:34} {statistics.median(r['dumps']):9.2f} {statistics.median(r['loads']):9.2f} "
                  f"{len(data):6}  {'yes' if exact else 'NO'}")


if __name__ == "__main__":
    main()
