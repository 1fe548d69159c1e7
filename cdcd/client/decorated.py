"""The types of ``@cache.cached`` functions: the decorated function's own signature, plus ``.key`` and
``.invalidate`` taking the same arguments, so a type checker sees all three (no ``type: ignore`` in user code).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)


class CachedFunction(Protocol[P, R_co]):
    """A sync function decorated with :meth:`cdcd.client.Cache.cached`."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str | None:
        """The cache key these arguments map to (None: a None/empty key argument, not cached)."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry these arguments map to, everywhere (see :meth:`Cache.delete`)."""
        ...


class AsyncCachedFunction(Protocol[P, R_co]):
    """An ``async def`` function decorated with :meth:`cdcd.client.AsyncCache.cached`."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str | None:
        """The cache key these arguments map to (None: a None/empty key argument, not cached)."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, bool]:
        """Delete the entry these arguments map to, everywhere (see :meth:`AsyncCache.delete`)."""
        ...
