"""Postgres LSNs: the 64-bit WAL positions cdcd uses as versions, and their ``X/Y`` text form.

One definition for the replication source, the decoder, ``cdcd warm`` (a slot's consistent
point) and the logs, so a position prints and parses the same everywhere.
"""

from __future__ import annotations


def lsn_to_str(lsn: int) -> str:
    """``0x16B3748`` -> ``0/16B3748`` (as Postgres prints a ``pg_lsn``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """``0/16B3748`` -> ``0x16B3748``."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
