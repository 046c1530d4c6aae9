"""The package's layers, checked from the source: LoRA tools, generation, the model and the planner do not depend
on the trainer, and the LoRA modules import one another without a circle. Imports inside functions count too."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "musubi_tuner"
BELOW_THE_TRAINER = ("hunyuan", "data", "networks", "inference", "planning")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every musubi_tuner module `path` imports (`from musubi_tuner.x import y` counts as x, and as x.y when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("musubi_tuner")}


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_nothing_below_the_trainer_imports_it():
    offending = sorted(f"{name} imports {target}" for name, targets in graph().items()
                       if name.split(".")[1:2] and name.split(".")[1] in BELOW_THE_TRAINER for target in targets if target.startswith("musubi_tuner.training"))
    assert offending == []


def test_the_lora_modules_import_one_another_without_a_circle():
    g = {name: {t for t in targets if t.startswith("musubi_tuner.networks.")}
         for name, targets in graph().items() if name.startswith("musubi_tuner.networks.")}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        for target in sorted(g[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(g):
        visit(name, [])
