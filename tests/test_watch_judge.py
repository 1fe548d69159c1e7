"""How ``inspect --watch`` judges one read between two reads of its rows (pure logic: no servers).

The end-to-end tests (tests/test_inspect_watch.py) show the totals on a real stream; these pin the
cases a real stream hits only by timing: a row that changed around the read, an entry ahead of
the sample.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cdcd.fillguard import Entry
from cdcd.inspect.classify import Classifier, projection
from cdcd.inspect.model import Check, DbRow, Table
from cdcd.inspect.nines import NinesCounter
from cdcd.inspect.watch import Candidate, Watcher
from cdcd.inspect.watchreport import WatchReport
from tests.helpers import config_dict, make_config

READ_AT = 1_000.0  # Redis clock of the read (the two clocks are aligned: offset 0)
BEFORE = 5_000  # WAL position read before the sample


@pytest.fixture
def table() -> Table:
    rules = make_config(config_dict("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1", "s", "p:")).rules()
    return Table("public.users", rules.by_relation["public.users"], [], ["id"], 0)


@pytest.fixture
def watcher() -> Watcher:
    w = object.__new__(Watcher)
    w.inspector = SimpleNamespace(classifier=Classifier(commit_timestamps=True))  # type: ignore[assignment]
    w.report = WatchReport(NinesCounter((0.01, 1.0)), 1.0, None)
    return w


def row(name: str, committed: float, xmin: str) -> DbRow:
    values: dict[str, Any] = {"id": 1, "email": "a@x", "name": name, "tenant_id": 1, "updated_at": None}
    return DbRow(ctid="(0,1)", xmin=xmin, committed=committed, raw={}, values=values)


def cdc(table: Table, r: DbRow, version: int) -> Entry:
    return Entry("p:user:1", str(version), "1", projection(table.rule, r), writer="cdc")


def judge(w: Watcher, table: Table, entry: Entry | None, sampled: DbRow, now: DbRow) -> Candidate | None:
    c = Check("p:user:1", table, [], [sampled], entry)
    return w._judge(c, [sampled], [now], READ_AT, BEFORE, {})


OLD = row("old", committed=990.0, xmin="10")
NEW_BEFORE_READ = row("new", committed=999.5, xmin="11")  # committed 0.5 s before the read
NEW_AFTER_READ = row("new", committed=1_000.2, xmin="11")  # committed between the read and the re-read


def test_unchanged_row_equal_entry_is_consistent(watcher: Watcher, table: Table) -> None:
    assert judge(watcher, table, cdc(table, OLD, 100), OLD, OLD) is None
    assert watcher.report.counter.consistent == 1


def test_unchanged_row_older_entry_is_stale_since_the_row_committed(watcher: Watcher, table: Table) -> None:
    older = row("older", committed=980.0, xmin="9")
    cand = judge(watcher, table, cdc(table, older, 90), OLD, OLD)
    assert cand is not None and cand.staleness == pytest.approx(10.0)  # read at 1000, row committed at 990


def test_change_committed_before_the_read_is_what_the_entry_misses(watcher: Watcher, table: Table) -> None:
    cand = judge(watcher, table, cdc(table, OLD, 100), OLD, NEW_BEFORE_READ)
    assert cand is not None and cand.staleness == pytest.approx(0.5)


def test_change_after_the_read_entry_equal_to_either_version_is_consistent(watcher: Watcher, table: Table) -> None:
    assert judge(watcher, table, cdc(table, OLD, 100), OLD, NEW_AFTER_READ) is None  # the state at the read
    assert judge(watcher, table, cdc(table, NEW_AFTER_READ, 6_000), OLD, NEW_AFTER_READ) is None  # already new
    assert watcher.report.counter.consistent == 2 and watcher.report.counter.stale == 0


def test_entry_from_a_commit_the_sample_could_not_see_is_ahead(watcher: Watcher, table: Table) -> None:
    between = row("between", committed=1_000.1, xmin="12")  # neither the sample nor the re-read
    assert judge(watcher, table, cdc(table, between, BEFORE + 10), OLD, NEW_AFTER_READ) is None
    assert watcher.report.ahead == 1 and watcher.report.counter.consistent == 1
    # the same value from a commit the sample did see cannot be newer than it: judged against the sample
    cand = judge(watcher, table, cdc(table, between, BEFORE - 10), OLD, NEW_AFTER_READ)
    assert cand is not None and cand.staleness == pytest.approx(10.0)


def test_nothing_served_is_a_miss_not_a_read(watcher: Watcher, table: Table) -> None:
    tombstone = Entry("p:user:1", "100", "1", None)
    assert judge(watcher, table, tombstone, OLD, OLD) is None
    assert judge(watcher, table, None, OLD, OLD) is None
    c = watcher.report.counter
    assert c.misses == 2 and c.reads == 0


def test_unknown_commit_time_gives_unknown_staleness(watcher: Watcher, table: Table) -> None:
    older = row("older", committed=980.0, xmin="9")
    frozen = DbRow(OLD.ctid, OLD.xmin, None, OLD.raw, OLD.values)
    cand = judge(watcher, table, cdc(table, older, 90), frozen, frozen)
    assert cand is not None and cand.staleness is None


def test_a_kafka_source_is_refused_clearly() -> None:
    """Rows come from Postgres and settling compares slot LSNs: the watch, like inspect, needs the postgres source."""
    from cdcd.inspect import InspectError

    data = config_dict("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1", "s", "p:")
    data["source"] = {"type": "kafka", "bootstrap_servers": "127.0.0.1:1", "topics": ["t"]}
    with pytest.raises(InspectError, match="postgres source"):
        Watcher(make_config(data), bounds=(1.0,), rate=10, batch=10, settle_timeout=1, check_bound=1.0,
                min_nines=None)
