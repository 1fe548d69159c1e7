"""Table epochs: the runtime state of table tags, owned by whoever writes values.

A value written by the daemon (or ``cdcd warm``) records the counter of its table's tag
(``{"#table:public.users": "7"}``); a TRUNCATE bumps the counter, so every value recorded under
the old one reads as stale at once. The writer must therefore know each table's current counter:
it reads them at start, follows its own bumps and restores them after Redis lost its memory.

This is state learned from Redis while running, not configuration, so it lives here, in an object
the sink owns, and not in :class:`cdcd.rules.Rules` (which stays an immutable description of the
rules file).
"""

from __future__ import annotations

import json
from collections.abc import ItemsView


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TableEpochs:
    """table tag -> its counter as this process last read or moved it (a string, as Redis returns it)."""

    def __init__(self) -> None:
        self._epochs: dict[str, str] = {}
        self._snapshots: dict[str, tuple[str, str]] = {}  # tag -> (epoch, its JSON snapshot)

    def __contains__(self, tag: object) -> bool:
        return tag in self._epochs

    def __len__(self) -> int:
        return len(self._epochs)

    def get(self, tag: str) -> str | None:
        return self._epochs.get(tag)

    def set(self, tag: str, epoch: bytes | str | int) -> None:
        """The counter as read from (or returned by) Redis."""
        self._epochs[tag] = _text(epoch)

    def moved(self, tag: str, epoch: bytes | str | int) -> None:
        """A bump returned ``epoch``: follow it if ``tag`` is a table tag this process tracks."""
        if tag in self._epochs:
            self._epochs[tag] = _text(epoch)

    def items(self) -> ItemsView[str, str]:
        return self._epochs.items()

    def snapshot(self, tag: str) -> str:
        """JSON ``{table_tag: counter}`` recorded with written values ("" if unknown)."""
        epoch = self._epochs.get(tag)
        if epoch is None:
            return ""
        cached = self._snapshots.get(tag)
        if cached is None or cached[0] != epoch:
            cached = (epoch, json.dumps({tag: epoch}, separators=(",", ":")))
            self._snapshots[tag] = cached
        return cached[1]
