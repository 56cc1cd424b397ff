"""The package's layout: layers that import only downward, no import circles, modules under 700 lines, and the
top-level paths from before the layers importing as the same module objects."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

import gxpo_lib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gxpo_lib"
# Bottom to top: a module may import from its own layer and the layers below it (gxpo_lib/__init__.py).
LAYERS = {"config": 0, "choices": 0, "validation": 0, "paths": 0, "core": 1, "rl": 2, "analysis": 3,
          "integrations": 3, "teach": 4, "experiment": 5, "sweep": 5, "__main__": 5}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported(path: Path) -> list[tuple[int, str]]:
    """Every gxpo_lib module a file imports (module level and inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gxpo_lib"):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "gxpo_lib" else [node.module]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gxpo_lib")]
    return found


def test_every_module_is_in_a_layer_and_imports_only_downward():
    upward = []
    for module, path in _modules().items():
        mine = _layer(module)
        if mine == "__init__":
            continue
        assert mine in LAYERS, f"{module} is in no layer: add its folder to the layers (gxpo_lib/__init__.py)"
        for line, target in _imported(path):
            theirs = _layer(target)
            if theirs in LAYERS and LAYERS[theirs] > LAYERS[mine]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_relative_imports_and_no_import_circles():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import_cycles = importlib.import_module("import_cycles")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert import_cycles.cycles(import_cycles.module_graph(PACKAGE)) == []
    relative = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in PACKAGE.rglob("*.py")
                for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports (the layers read from absolute ones): {relative}"


def test_no_module_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 700}
    assert not long, long


@pytest.mark.parametrize("old", sorted(gxpo_lib.FLAT_PATHS))
def test_a_flat_path_imports_the_moved_module_itself(old):
    assert not (PACKAGE / f"{old}.py").exists()
    moved = importlib.import_module(f"gxpo_lib.{gxpo_lib.FLAT_PATHS[old]}")
    assert importlib.import_module(f"gxpo_lib.{old}") is moved
    assert getattr(__import__("gxpo_lib", fromlist=[old]), old) is moved


def test_the_spec_public_names_import():
    from gxpo_lib.evaluation import pass_at_k
    from gxpo_lib.extrapolation import geometric_scale, retention_ratio
    from gxpo_lib.losses import group_advantages, policy_loss
    from gxpo_lib.rewards import math_reward

    from gxpo_lib import GXPO, SFPO, PlainStep, ShutoffGate

    assert GXPO.__module__ == "gxpo_lib.core.rules" and SFPO.__module__ == "gxpo_lib.core.sfpo"
    assert {PlainStep.__module__, ShutoffGate.__module__} == {"gxpo_lib.core.rules", "gxpo_lib.core.gate"}
    assert all(callable(f) for f in (pass_at_k, geometric_scale, retention_ratio, group_advantages, policy_loss,
                                     math_reward))
    assert "gxpo_lib.core.rules" in sys.modules  # the old name did not load a second copy
    assert sys.modules["gxpo_lib.rules"] is sys.modules["gxpo_lib.core.rules"]


def test_the_repository_uses_the_layered_paths():
    """Every move was made everywhere at once: code, tests, notebooks, docs and scripts name the new paths."""
    flat = re.compile(r"(?<![\w.])gxpo_lib\.(" + "|".join(gxpo_lib.FLAT_PATHS) + r")(?!\w)"
                      r"|from gxpo_lib import [^\n]*\b(" + "|".join(gxpo_lib.FLAT_PATHS) + r")\b"
                      r"|gxpo_lib/(" + "|".join(gxpo_lib.FLAT_PATHS) + r")\.py")
    places = [PACKAGE, ROOT / "tests", ROOT / "notebooks", ROOT / "docs", ROOT / "scripts", ROOT / "bench"]
    files = [ROOT / "README.md", ROOT / "Makefile"]
    files += [p for place in places for p in place.rglob("*")
              if p.suffix in (".py", ".ipynb", ".md", ".sh", ".yaml") and "node_modules" not in p.parts]
    skip = {PACKAGE / "__init__.py", Path(__file__).resolve()}
    hits = []
    for path in files:
        if path.resolve() in skip or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if flat.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "flat paths left:\n" + "\n".join(hits[:20])
