"""What counts as "Redis is down, try again later", and how long to wait before the next try.

Shared by the single-target loop (:mod:`cdcd.daemon`) and the per-target appliers of a multi-target
daemon (:mod:`cdcd.targets`), so both retry the same faults on the same schedule.
"""

from __future__ import annotations

import redis
from redis.backoff import AbstractBackoff

from cdcd.redisfaults import REDIS_FAULTS

# Everything a Redis call can raise that means "try again later"; see cdcd.redisfaults.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, *REDIS_FAULTS)

# redis-py 5 (our floor) computes ``base * 2**failures``, which overflows a float after ~1000 failures
# (about an hour into an outage at the default 5 s cap); past this exponent the delay is at the cap anyway.
_MAX_EXPONENT = 32


def retry_delay(policy: AbstractBackoff, failures: int) -> float:
    """The wait after the ``failures``-th consecutive failure (0-based), from redis-py's own backoff."""
    return policy.compute(min(failures, _MAX_EXPONENT))
