"""Who may import whom (docs/design.md, ../shared/PLATFORM.md), checked on the source: every import
statement, function-level lazy imports included, so a forbidden import fails here even if no test happens
to execute it.

- vla_core: a module imports only from modules to its left in ORDER; never kfp, components or pipelines.
- components: vla_core, kfp and their own package only (no pipelines, no other third-party code: a
  component is a thin adapter, anything it computes belongs in vla_core).
- pipelines: components, kfp, vla_core and their own package (plus the core dependencies its command line
  uses: tyro, pyyaml); never the other way round.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["env_names", "utils", "keeper", "telemetry", "storage", "data", "world", "policy", "train", "envs", "eval",
         "experiments", "cli"]
CORE = ROOT / "vla_core"
OUR_PACKAGES = ("vla_core", "components", "pipelines")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module in OUR_PACKAGES:  # `from vla_core import data`
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: use absolute imports (the layer rules read them)")
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def _core_layer(module: str) -> str:
    part = module.split(".")[1] if module.startswith("vla_core.") else ""
    return part if part in ORDER else ""


def test_vla_core_imports_only_to_its_left_and_never_the_platform():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20, f"expected the package sources under {CORE}"
    problems = []
    for path in files:
        rel = path.relative_to(CORE)
        own = rel.parts[0].removesuffix(".py")
        for line, name in _imports(path):
            where = f"vla_core/{rel}:{line}"
            if _top(name) in ("kfp", "components", "pipelines"):
                problems.append(f"{where} imports {name}: vla_core never imports kfp, components or pipelines")
                continue
            if own not in ORDER:
                continue  # the package's __init__.py
            other = _core_layer(name)
            if other and ORDER.index(other) > ORDER.index(own):
                problems.append(f"{where} ({own}) imports {name} ({other})")
    assert not problems, "forbidden imports (order: " + " -> ".join(ORDER) + "):\n" + "\n".join(problems)


def _stdlib(name: str) -> bool:
    return _top(name) in sys.stdlib_module_names or _top(name) == "__future__"


def _check_package(folder: str, allowed: set[str]) -> list[str]:
    problems = []
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"expected sources under {ROOT / folder}"
    for path in files:
        for line, name in _imports(path):
            if not _stdlib(name) and _top(name) not in allowed:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {name} (allowed: stdlib, "
                                f"{', '.join(sorted(allowed))})")
    return problems


def test_components_import_only_vla_core_and_kfp():
    problems = _check_package("components", {"vla_core", "kfp", "components"})
    assert not problems, "\n".join(problems)


def test_pipelines_import_components_not_the_other_way_round():
    problems = _check_package("pipelines", {"components", "kfp", "vla_core", "pipelines", "tyro", "yaml"})
    assert not problems, "\n".join(problems)


def test_the_library_and_its_command_line_load_without_kfp():
    """`wmvla --help` and every vla_core module import without kfp: the pipeline commands are registered in
    cli.py by module path and imported only when run (vla_core needs no `pipeline` extra)."""
    code = ("import sys, pkgutil, importlib, vla_core, vla_core.cli\n"
            "for m in pkgutil.walk_packages(vla_core.__path__, 'vla_core.'):\n"
            "    if m.name.split('.')[-1] not in ('libero_env',):\n"
            "        importlib.import_module(m.name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'components', 'pipelines'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
