"""The package's structure holds itself: the rules between the wings (import-linter's contracts in
pyproject.toml), no private name used outside the module that defines it, and docs/architecture.md
as the map of the package as it is."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_diffusiongemma"
DOC = ROOT / "docs" / "architecture.md"


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "convert").rglob("*.py")])


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_hold():
    """import-linter over the package and the converter: layers, no circles, the forbidden edges."""
    env = {"PYTHONPATH": str(ROOT), "PATH": ""}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(_contracts())} kept, 0 broken" in proc.stdout


def _private_crossings(path: Path, root: Path = ROOT) -> list[str]:
    """`from ours import _name`, and `thing._name` where this module defines no `_name`."""
    tree = ast.parse(path.read_text())
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] in ("mlx_diffusiongemma", "convert")
            for alias in node.names:
                if ours and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and name not in defined:
                found.append(f"{path.relative_to(root)}:{node.lineno}: uses .{name}")
    return found


def test_no_private_name_crosses_a_module():
    found = [line for path in _sources() for line in _private_crossings(path)]
    assert not found, "\n".join(found)


def test_the_private_name_check_finds_a_crossing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .model import _embed\nclass A:\n    def f(self, m):\n        self._y = 1\n"
                   "        return m._encode(self._x, self._y)\n")
    found = [line.split(": ", 1)[1] for line in _private_crossings(bad, tmp_path)]
    assert sorted(found) == ["imports _embed", "uses ._encode", "uses ._x"]  # ._y is this module's own


# -- docs/architecture.md is the map of the package ----------------------------------------------


def _wing_table() -> list[tuple[str, str, list[str]]]:
    """(layer, wing, modules) rows of the doc's wing table."""
    text = DOC.read_text()
    block = text.split("<!-- wings:begin -->", 1)[1].split("<!-- wings:end -->", 1)[0]
    rows = []
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        layer, wing, modules = cells[0], cells[1].strip("`"), re.findall(r"`([^`]+)`", cells[3])
        rows.append((layer, wing, modules))
    return rows


def _modules_of(wing: str) -> list[str]:
    base = ROOT / "convert" if wing == "convert/" else PACKAGE / wing
    if wing.endswith(".py"):
        return [wing[:-3]]
    return sorted(p.stem for p in base.glob("*.py") if p.stem != "__init__")


def test_the_map_lists_every_wing_and_module():
    rows = _wing_table()
    mapped = {wing for _, wing, _ in rows}
    actual = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    actual |= {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {"convert/"}
    assert mapped == actual, f"in the map only: {sorted(mapped - actual)}; in the package only: {sorted(actual - mapped)}"
    for _, wing, modules in rows:
        assert sorted(modules) == _modules_of(wing), wing


def test_the_map_states_the_layers_and_rules_the_checks_enforce():
    rows = _wing_table()
    contracts = {c["id"]: c for c in _contracts()}
    order: dict[str, int] = {}
    for layer, wing, _ in rows:
        if wing in ("convert/",):
            continue
        order[wing.rstrip("/").removesuffix(".py")] = int(layer)
    layers = [re.split(r"\s*[|:]\s*", entry) for entry in contracts["wings"]["layers"]]
    first = min(order.values())  # `__main__.py`, the `python -m` entry, is layer 0 above the faces
    assert {m: i + first for i, group in enumerate(layers) for m in group} == order
    text = DOC.read_text()
    for contract in contracts.values():
        assert contract["name"] in text, f"docs/architecture.md does not state the rule {contract['name']!r}"


@pytest.mark.parametrize("path", ["README.md", "docs/architecture.md", "docs/python-api.md", "docs/fast-mode.md",
                                  "docs/sampler.md", "docs/editing.md", "docs/server.md", "docs/training.md"])
def test_docs_name_only_modules_that_exist(path):
    """Module paths written as `mlx_diffusiongemma.x.y` in the docs exist."""
    text = (ROOT / path).read_text()
    for dotted in set(re.findall(r"mlx_diffusiongemma(?:\.[a-z_]+)+", text)):
        parts = dotted.split(".")[1:]
        while parts:
            base = ROOT if parts[0] == "convert" else PACKAGE  # installed as mlx_diffusiongemma.convert
            candidate = base.joinpath(*parts)
            if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
                break
            parts = parts[:-1]  # the rest is an attribute
        assert parts or dotted == "mlx_diffusiongemma", f"{path}: {dotted} names no module"
