"""The package's structure: layers that import only downwards, no private name used across modules,
small modules, few modules at the top."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxcrit"
SOURCES = sorted(p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py")])


def test_imports_follow_the_layers():
    """import-linter's layers contract (pyproject.toml) holds: no cycle, no import runs back up."""
    got = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--config", str(ROOT / "pyproject.toml")],
                         cwd=ROOT, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-2000:]


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


# The standard library's public names that start with an underscore (namedtuple's methods, os._exit).
PUBLIC_UNDERSCORED = {"_asdict", "_replace", "_fields", "_make", "_exit"}


def private_uses(path: Path) -> list[str]:
    """`from X import _y`, and `x._y` for any x but self and cls: names a module or a class keeps to
    itself, used from outside it."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxcrit":
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and node.attr not in PUBLIC_UNDERSCORED
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_private_name_is_used_outside_its_module():
    found = [u for p in SOURCES for u in private_uses(p)]
    assert not found, "\n".join(found)


def test_modules_are_small_and_the_top_level_is_short():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_every_package_is_a_layer():
    """The layers contract names every package and top-level module, so none escapes the check."""
    import tomllib
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    parts = {f"jaxcrit.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    parts |= {f"jaxcrit.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert parts == named, (sorted(parts - named), sorted(named - parts))
