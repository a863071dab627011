"""The packages import down the layers of DESIGN.md only: no import circle, and each package imports on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mambakit

SRC = Path(mambakit.__file__).parent

# DESIGN.md's floors, bottom up; a package may import its own floor or lower ones at module level
FLOOR = {"deprecation": 0, "data": 0, "ops": 0, "modules": 1, "models": 2, "checkpoints": 3, "generation": 4,
         "training": 5, "evaluation": 5, "reproduce": 6, "serving": 6, "bench": 6, "cli": 7, "__init__": 8,
         "__main__": 8}
# the only imports that reach up a floor, each inside a function: MambaLM's conveniences, which DESIGN.md puts
# on the model but whose implementations live above it (they run at call time, never at import time)
CALL_TIME_UPWARD = {("models/mamba_lm.py", "generation"), ("models/mamba_lm.py", "checkpoints")}


def _imports() -> list[tuple[str, str, str, bool]]:
    """(file, its package, imported mambakit package, at module level?) for every import between packages."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        package = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:  # relative: resolve against the file's folder
                parts = list(rel.parts[:-1])[:len(rel.parts) - node.level] + (node.module or "").split(".")
            elif (node.module or "").startswith("mambakit."):
                parts = node.module.split(".")[1:]
            else:
                continue
            parts = [p for p in parts if p]
            if parts and parts[0] != package:
                found.append((str(rel), package, parts[0], id(node) in top))
    return found


def test_module_level_imports_go_down_the_floors_and_form_no_circle():
    imports = _imports()
    assert imports, "the scan found no imports between packages"
    upward = [(f, target) for f, package, target, top in imports if top and FLOOR[target] > FLOOR[package]]
    assert upward == []
    graph: dict[str, set[str]] = {}
    for _, package, target, top in imports:
        if top:
            graph.setdefault(package, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and (seen.add(n) or reaches(n, goal, seen)))
                   for n in graph.get(start, ()))

    circles = sorted(p for p in graph if reaches(p, p, set()))
    assert circles == []


def test_the_only_call_time_imports_up_a_floor_are_the_models_conveniences():
    upward = {(f, target) for f, package, target, top in _imports() if not top and FLOOR[target] > FLOOR[package]}
    assert upward == CALL_TIME_UPWARD


@pytest.mark.slow  # a fresh interpreter imports torch: ~10 s each on 2 busy cores
@pytest.mark.parametrize("package", [pytest.param(p, id=p) for p in ("ops", "modules", "models", "checkpoints",
                                                                     "generation")])
def test_each_package_imports_first_in_a_fresh_interpreter(package):
    """A circle between packages shows as an ImportError only when one of them is imported first."""
    done = subprocess.run([sys.executable, "-c", f"import mambakit.{package} as p; print(p.__name__)"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"mambakit.{package}"
