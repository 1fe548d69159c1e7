"""The last-timestamp memos on the hot path return exactly what an unmemoized parse / isoformat gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from cdcd.pg import pgtypes
from cdcd.rules import _json_default, encode_projection


def test_timestamp_converters_match_a_fresh_parse_in_any_order() -> None:
    texts = ["2026-12-05 12:00:00.123456+00", "2026-12-05 12:00:00.123456+00", "2026-12-05 13:00:00+02",
             "infinity", "infinity", "-infinity", "2026-12-05 12:00:00.123456+00", "2026-12-05 13:00:00+02",
             "2026-12-05 12:00:00", "0044-03-15 00:00:00 BC", "2026-12-05 12:00:00"]
    for conv in (pgtypes._timestamp, pgtypes._timestamptz):
        for t in texts + texts[::-1]:
            got, want = conv(t), pgtypes._parse_timestamp(t)
            assert got == want and type(got) is type(want), t
            if isinstance(want, datetime):
                assert got.isoformat() == want.isoformat()  # same offset too, not only the same instant


def reference(row: dict[str, object]) -> bytes:
    return json.dumps(row, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()


def test_projection_of_shared_and_distinct_timestamps_matches_json_dumps() -> None:
    t = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)
    same_instant_other_zone = t.astimezone(timezone(timedelta(hours=2)))
    naive = t.replace(tzinfo=None)
    rows = [{"a": t, "b": t}, {"a": same_instant_other_zone}, {"a": t}, {"a": naive}, {"a": t, "b": naive},
            {"a": t + timedelta(microseconds=1)}, {"a": t}]
    for row in rows + rows[::-1]:
        assert encode_projection(row) == reference(row), row
