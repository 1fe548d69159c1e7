"""The cyclic garbage collector's settings for the daemon process.

Why: the hot path allocates several container objects per row change (the decoded row, the Change, the
Transaction, each Write) and frees them a batch later. With CPython's default threshold (a young
collection every 700 net container allocations) the collector runs every ~100 changes and each young
and middle collection walks tens of thousands of objects that are about to be freed by reference
counting anyway; the data path makes no reference cycles, so that walking finds nothing. The daemon
therefore freezes what startup built (modules, compiled rules, pydantic models: never garbage) and
collects young objects less often. Memory stays bounded: cycles (e.g. from an exception's traceback)
are still collected, just every ``GEN0`` allocations instead of every 700.
"""

from __future__ import annotations

import gc

GEN0 = 50_000
"""Net container allocations between young collections (CPython's default: 700)."""


def tune_for_daemon() -> None:
    """Called once by ``cdcd run`` after startup, before the loop: not by library users' processes."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0, gen1, gen2)
