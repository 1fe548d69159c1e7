"""Bloom filter arithmetic shared by the daemon (which sets bits) and the client (which reads them).

Why a module of its own: a filter is only sound if both sides compute the same bit positions for a
key. Both use :func:`hash_pair` from here (the client through :func:`positions`, the daemon's Lua
script through the same running sum), and this module is free of pydantic and of I/O so the client
can import it.

A key's ``k`` positions come from one 128-bit BLAKE2b digest of its UTF-8 text (lone surrogates
kept as ``surrogatepass``, as any ``str`` a row can render), split into two 64-bit halves and
combined by double hashing (Kirsch and Mitzenmacher, "Less hashing, same performance", 2006):
``(h1 + i * h2) mod m`` for ``i < k``, computed as a running sum of ``h1 mod m`` and ``h2 mod m``.
The digest is a stable function of the text: it does not depend on the process (unlike ``hash()``),
the platform or the Python version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from hashlib import blake2b

MAX_BITS = 2**32  # one Redis string holds at most 512 MB = 2**32 bits
_MASK64 = 2**64 - 1


@dataclass(frozen=True, slots=True)
class BloomParams:
    """``m`` bits and ``k`` hash functions for ``expected`` keys at false-positive rate ``fp_rate``."""

    m: int
    k: int

    @classmethod
    def sized(cls, expected: int, fp_rate: float) -> BloomParams:
        """The textbook optimum: ``m = -n ln p / (ln 2)^2``, ``k = (m / n) ln 2`` (10M keys at 1%: 95.9 Mbit,
        ~12 MB, k = 7). ValueError when the filter would not fit in one Redis string."""
        if expected < 1 or not 0.0 < fp_rate < 1.0:
            raise ValueError(f"need expected >= 1 and 0 < fp_rate < 1 (got {expected}, {fp_rate})")
        m = math.ceil(-expected * math.log(fp_rate) / (math.log(2) ** 2))
        if m > MAX_BITS:
            raise ValueError(f"{expected} keys at fp_rate {fp_rate} need {m} bits ({m / 8 / 2**20:.0f} MiB): more "
                             f"than one Redis string holds ({MAX_BITS} bits, 512 MiB)")
        k = max(1, round(m / expected * math.log(2)))
        return cls(m, k)

    @property
    def bytes(self) -> int:
        return (self.m + 7) // 8

    def fp_rate(self, fill: float) -> float:
        """The false-positive rate of a filter whose fraction ``fill`` of bits is set: every one of a key's
        ``k`` bits set by chance. Deleted keys' bits stay set, so this grows with churn, not with size."""
        return fill ** self.k


def params_id(m: int, k: int, template: str) -> str:
    """What a filter is for, as its meta records it (``ap``): bits, hash count and key template. Daemon and
    client only use a filter whose parameters are exactly theirs."""
    return f"{m}:{k}:{template}"


def parse_params_id(text: str) -> tuple[int, int, str]:
    """The inverse of :func:`params_id`; ValueError when ``text`` is not one."""
    m, k, template = text.split(":", 2)
    return int(m), int(k), template


def hash_pair(key: str, m: int) -> tuple[int, int]:
    """``(h1 mod m, h2 mod m)`` of ``key``: the daemon sends these two numbers per key and its Lua script walks
    the ``k`` offsets itself (each step below ``2 * m``, so exact in Lua's doubles), which sends Redis two
    arguments per key instead of ``k``."""
    d = int.from_bytes(blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest(), "little")
    return (d & _MASK64) % m, ((d >> 64) | 1) % m  # h2 odd: never 0 before the reduction


def positions(key: str, m: int, k: int) -> list[int]:
    """The ``k`` bit offsets of ``key`` in a filter of ``m`` bits (see the module docstring): what the client
    reads, and what :data:`cdcd.keyspace.EXISTS_ADD` sets from :func:`hash_pair`."""
    a, b = hash_pair(key, m)
    out = [a]
    for _ in range(k - 1):
        a += b
        if a >= m:
            a -= m
        out.append(a)
    return out
