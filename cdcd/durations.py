"""Durations as the YAML rules write them (``90``, ``90s``, ``10m``, ``2h``, ``1d``, ``250ms``), in seconds.

One parser for the daemon's rules and the client's options, so ``ttl: 10m`` means the same in both.
Pure: the client imports it without the daemon's dependencies.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(v: float | str) -> float:
    """Seconds from a number (as is) or a duration string; ``ValueError`` for anything else."""
    if isinstance(v, str):
        m = _DURATION.fullmatch(v)
        if not m:
            raise ValueError(f"{v!r} is not a duration (e.g. 60, 90s, 10m, 2h, 1d)")
        return float(m.group(1)) * _UNIT[m.group(2)]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{v!r} is not a duration (seconds, or e.g. 90s, 10m, 2h, 1d)")
    return float(v)
