"""Short fault-injection soak (the long one is ``bench/soak.py``): >= 20 SIGKILLs of the daemon, a Redis
restart, a Redis pause, a Postgres restart and malformed messages, while a writer and a guarded reader
keep going. Afterwards: nothing stale, nothing lost, every malformed message dead-lettered, daemon alive.

Marked ``soak``: deselected unless asked for, ``pytest -m soak tests/test_soak.py`` (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import MALFORMED, run_soak


@pytest.mark.soak
def test_soak_kills_restarts_pauses_and_garbage(tmp_path: Path) -> None:
    res = run_soak(kills=20, seed=7, ops=100_000, op_pause=0.002, workdir=tmp_path)
    assert res.problems() == []
    assert res.kills >= 20
    assert res.restarts == {"redis": 1, "postgres": 1, "redis_pause": 1}
    assert res.ops > 500 and res.writer_retries > 0  # the writer did ride through the Postgres restart
    assert res.daemon_alive
    report = res.report
    assert report is not None and report.keys_checked > 100 and report.cached > 50
    assert not report.stale and not report.unsettled
    # every kind of garbage was sent, and each one is in the dead-letter stream with reason and position
    assert len(res.malformed_sent) >= len(MALFORMED)
    assert not res.missing_dead_letters
    reasons = {d["reason"].split(":")[0] for d in res.dead_letters}
    assert reasons == {"malformed cdcd message"}
    big = [d for d in res.dead_letters if "x" * 1000 in d["raw"]]
    assert big and all(len(d["raw"]) <= 65_536 for d in big)  # the 1 MiB message, truncated
