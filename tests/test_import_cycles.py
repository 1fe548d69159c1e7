"""No import cycles among ``cdcd.*`` modules.

The rule: an edge ``a -> b`` is any ``import`` of ``b`` written anywhere in ``a``: at module level,
inside a function (a lazy import still runs, only later), and inside ``if TYPE_CHECKING:`` (never
executed, but a type-only cycle still means neither module can be read, type-checked or replaced
without the other; the ``daemon`` <-> ``ops`` cycle of issue 11 was exactly such a pair: a lazy
import one way, a ``TYPE_CHECKING`` import back). Importing ``cdcd.x.y`` also runs the package
``cdcd.x/__init__``; that implicit parent edge is not counted (every package re-exporting its
submodules would otherwise be a cycle). Static analysis with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "cdcd"

# Known and tracked elsewhere, nothing else. Empty: the client's subscriber, which once named the caches
# it serves, now depends on a protocol the core satisfies (issue 10).
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a (possibly relative) ``from ... import`` base."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module)
                # ``from pkg import name``: name may be a submodule (an edge to it) or an attribute (to pkg)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                # ``import cdcd.sinks.redis`` depends on that module; an unknown tail is an attribute
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("cdcd"):
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_the_graph_sees_every_kind_of_import() -> None:
    """The walker itself: lazy, TYPE_CHECKING and relative imports are all edges."""
    graph = import_graph()
    assert "cdcd.sinks.redis" in graph["cdcd.daemon"]  # module level
    assert "cdcd.sources.postgres" in graph["cdcd.daemon"]  # inside a method
    assert "cdcd.client.l1" in graph["cdcd.client.subscriber"]  # TYPE_CHECKING, relative
    assert "cdcd.client.link" in graph["cdcd.client.cache"]  # relative
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_cdcd() -> None:
    graph = import_graph()
    for a, b in ALLOWED:
        assert b in graph[a], f"allow-listed edge {a} -> {b} is gone: remove it from ALLOWED"
        graph[a].discard(b)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_ops_reads_the_daemon_only_through_its_protocol() -> None:
    assert not any(m == "cdcd.daemon" for m in import_graph()["cdcd.ops"])
