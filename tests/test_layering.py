"""The folders follow the data: a module imports only from modules to its left (docs/design.md).

Checked on the source (every import statement, function-level lazy imports included), so a backward import
fails here even if no test happens to execute it."""

from __future__ import annotations

import ast
from pathlib import Path

ORDER = ["utils", "data", "world", "policy", "train", "envs", "eval", "experiments", "cli"]
SRC = Path(__file__).resolve().parents[1] / "src" / "wmvla"


def _layer(module: str) -> str:
    part = module.split(".")[1] if module.startswith("wmvla.") else ""
    return part if part in ORDER else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "wmvla":  # `from wmvla import data`
                out += [(node.lineno, f"wmvla.{a.name}") for a in node.names]
    return out


def test_no_module_imports_backwards():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"expected the package sources under {SRC}"
    problems = []
    for path in files:
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        if own not in ORDER:
            continue  # __init__.py of the package
        for line, name in _imports(path):
            other = _layer(name)
            if other and ORDER.index(other) > ORDER.index(own):
                problems.append(f"src/wmvla/{rel}:{line} ({own}) imports {name} ({other})")
    assert not problems, "backward imports (allowed order: " + " -> ".join(ORDER) + "):\n" + "\n".join(problems)
