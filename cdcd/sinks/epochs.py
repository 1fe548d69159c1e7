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
    """table tag -> its counter as this process last read or moved it (a string, as Redis returns it).

    With hot-key replicas a table tag also has a mirror counter per replica slot (``slot`` below; None is the
    tag's own counter): a copy in that slot records the mirror, so the writer follows each of them too.
    """

    def __init__(self) -> None:
        self._epochs: dict[tuple[str, int | None], str] = {}
        self._snapshots: dict[tuple[str, int | None], tuple[str, str]] = {}  # -> (epoch, its JSON snapshot)

    def __contains__(self, tag: object) -> bool:
        return (tag, None) in self._epochs

    def __len__(self) -> int:
        return len(self._epochs)

    def get(self, tag: str, slot: int | None = None) -> str | None:
        return self._epochs.get((tag, slot))

    def set(self, tag: str, epoch: bytes | str | int, slot: int | None = None) -> None:
        """The counter as read from (or returned by) Redis."""
        self._epochs[(tag, slot)] = _text(epoch)

    def moved(self, tag: str, epoch: bytes | str | int, slot: int | None = None) -> None:
        """A bump returned ``epoch``: follow it if ``tag`` is a table tag this process tracks."""
        if (tag, slot) in self._epochs:
            self._epochs[(tag, slot)] = _text(epoch)

    def items(self) -> ItemsView[tuple[str, int | None], str]:
        """((tag, slot), counter) pairs: slot None is the tag's own counter, else its mirror in that slot."""
        return self._epochs.items()

    def snapshot(self, tag: str, slot: int | None = None) -> str:
        """JSON ``{table_tag: counter}`` recorded with written values ("" if unknown)."""
        epoch = self._epochs.get((tag, slot))
        if epoch is None:
            return ""
        cached = self._snapshots.get((tag, slot))
        if cached is None or cached[0] != epoch:
            cached = (epoch, json.dumps({tag: epoch}, separators=(",", ":")))
            self._snapshots[(tag, slot)] = cached
        return cached[1]
