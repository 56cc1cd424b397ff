"""List the module-level import cycles inside a package (function-level imports and ``if TYPE_CHECKING`` are
not followed; an ``if __name__ == "__main__"`` block counts, since ``python -m`` runs it).

    python scripts/import_cycles.py [gxpo_lib]      # exit 1 when a cycle exists
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    graph = {}
    for name, (path, package) in modules.items():
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(sub, ast.ImportFrom):
                    base = name.split(".") if package else name.split(".")[:-1]
                    if sub.level:
                        base = base[:len(base) - (sub.level - 1)]
                        target = ".".join(base + ([sub.module] if sub.module else []))
                    else:
                        target = sub.module or ""
                    deps.update(t for t in [target, *(f"{target}.{a.name}" for a in sub.names)] if t in modules)
                elif isinstance(sub, ast.Import):
                    deps.update(a.name for a in sub.names if a.name in modules)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main(argv: list[str] | None = None) -> int:
    root = Path((argv or sys.argv[1:] or ["gxpo_lib"])[0])
    found = cycles(module_graph(root))
    for component in found:
        print("cycle:", " <-> ".join(component))
    print(f"{len(found)} import cycle(s) in {root}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
