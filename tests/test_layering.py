"""The layering of docs/architecture.md §1, checked statically with `ast` (every import anywhere in a file
counts), one test per arrow:

- `curvplan/ir` and `curvplan/planner` (and the `curvplan.testing` helpers) never import jax, jaxlib or optax;
- `curvplan/ir` imports no other curvplan subpackage (in particular never `curvplan.planner`);
- `curvplan/planner` imports only `curvplan.ir`;
- `curvplan/modules` imports only `curvplan.ir` (modules never see the planner, lowering or runtime);
- `curvplan/lowering` imports only `curvplan.ir`, `curvplan.planner` and `curvplan.modules`;
- `curvplan/runtime` may import every layer;
- `curvplan/__init__.py` imports only `curvplan.ir` and `curvplan.planner` when it runs (the JAX half is lazy),
  which a fresh interpreter confirms: `import curvplan` loads no JAX.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "curvplan"
FORBIDDEN = {"jax", "jaxlib", "optax"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, dynamic ones (`import_module`) included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or node.level:  # `from . import x` may import submodules x
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            out.append((node.lineno, mod))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def layer_of(mod: str) -> str | None:
    """The curvplan subpackage (``ir``, ``planner``, ...) of a module name, or None outside curvplan."""
    parts = mod.split(".")
    if parts[0] != "curvplan":
        return None
    return parts[1] if len(parts) > 1 else ""


PURE = files("ir") + files("planner") + [PKG / "testing.py"]


def test_the_layers_exist():
    assert files("ir") and files("planner")
    assert any(p.name == "_compile.py" for p in files("planner"))


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_layers_never_import_jax(path):
    bad = [(line, mod) for line, mod in imports(path) if mod.split(".")[0] in FORBIDDEN]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: ir and planner must stay pure Python"


@pytest.mark.parametrize("path", files("ir"), ids=lambda p: str(p.relative_to(ROOT)))
def test_ir_imports_no_other_curvplan_layer(path):
    bad = [(line, mod) for line, mod in imports(path) if layer_of(mod) not in (None, "ir")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: curvplan.ir may import only curvplan.ir"


@pytest.mark.parametrize("path", files("planner"), ids=lambda p: str(p.relative_to(ROOT)))
def test_planner_imports_only_ir(path):
    bad = [(line, mod) for line, mod in imports(path) if layer_of(mod) not in (None, "ir", "planner")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: curvplan.planner may import only curvplan.ir"


ALLOWED = {
    "modules": {"ir", "modules"},
    "lowering": {"ir", "planner", "modules", "lowering"},
    "runtime": {"ir", "planner", "modules", "lowering", "runtime", "examples"},
}


@pytest.mark.parametrize("path", [p for layer in ALLOWED for p in files(layer)], ids=lambda p: str(p.relative_to(ROOT)))
def test_each_layer_imports_only_the_layers_below_it(path):
    layer = path.relative_to(PKG).parts[0]
    bad = [(line, mod) for line, mod in imports(path) if layer_of(mod) not in {None, *ALLOWED[layer]}]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: curvplan.{layer} may import {sorted(ALLOWED[layer])}"


def _runtime_imports(path: Path) -> list[tuple[int, str]]:
    """Imports that run when the file is imported: those under ``if TYPE_CHECKING:`` do not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    return [(n.lineno, n.module or "") for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and id(n) not in skip]


def test_the_package_root_imports_only_the_pure_layers():
    bad = [(line, mod) for line, mod in _runtime_imports(PKG / "__init__.py")
           if layer_of(mod) not in (None, "", "ir", "planner")]
    assert not bad, f"curvplan/__init__.py imports {bad} eagerly; JAX layers belong in _LAZY"
    code = "import sys, curvplan; print(sorted(m for m in ('jax', 'jaxlib', 'optax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_checker_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "curvplan" / "ir"
    pkg.mkdir(parents=True)
    f = pkg / "_probe.py"
    f.write_text(
        "import os\n"
        "def later():\n"
        "    import jax.numpy as jnp\n"
        "    from optax import adam\n"
        "    from .. import planner\n"
        "    from ..planner._plan import Plan\n"
        "    import importlib; importlib.import_module('jaxlib')\n"
        "    return __import__('curvplan.lowering')\n"
    )
    found = {mod for _, mod in imports(f, root=tmp_path)}
    assert {"os", "jax.numpy", "optax", "curvplan.planner", "curvplan.planner._plan", "jaxlib",
            "curvplan.lowering"} <= found
    assert {layer_of(m) for m in found} >= {None, "planner", "lowering"}
