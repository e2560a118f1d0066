"""Plan pictures: DOT structure, determinism, graphviz and matplotlib rendering, format errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

import curvplan as cp
from curvplan.ir import _visualize
from curvplan.ir.toy import Toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mods():
    return [
        Toy(name="hutch", reads=("hvp_op.hessian", "rng"), makes=("diag.hessian",), attrs=(("probes", 1),)),
        Toy(name="gnb", reads=("batch", "params"), makes=("diag.gn",), every=5),
        Toy(name="ema_h", reads=("diag.hessian",), makes=("v",), stateful=True, every=10,
            attrs=(("beta", 0.99),)),
        Toy(name="ema_gn", reads=("diag.gn",), makes=("vgn",), stateful=True, every=5,
            attrs=(("beta", 0.9),)),
        Toy(name="mom", reads=("grad",), makes=("m",), stateful=True, attrs=(("beta", 0.9),)),
        Toy(name="trust", reads=("loss", "update"), carry=("update",), makes=("radius",), stateful=True,
            every=5),
        Toy(name="dir", reads=("m", "v", "vgn", "radius"), carry=("v", "vgn", "radius"), makes=("update",),
            stateful=True),
    ]


@pytest.fixture(scope="module")
def plan():
    return cp.compile_plan(_mods(), name="viz")


def _edges(dot: str) -> list[str]:
    return [line.strip() for line in dot.splitlines() if "->" in line]


def test_one_cluster_per_phase(plan):
    dot = plan.to_dot()
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    clusters = re.findall(r"subgraph (cluster_\w+)", dot)
    phases = sorted(c for c in clusters if c != "cluster_legend")
    assert phases == sorted(f"cluster_{ph.index}" for ph in plan.phases)
    assert "cluster_legend" in clusters
    assert 'rankdir="LR"' in dot
    for ph in plan.phases:
        provs = ", ".join(ph.providers) if ph.providers else "-"
        assert f'label="phase {ph.index} {ph.header} [{provs}]"' in dot
    # node ids are unique
    ids = re.findall(r"^\s*(\w+) \[", dot, flags=re.M)
    ids = [i for i in ids if i not in ("graph", "node", "edge")]
    assert len(ids) == len(set(ids))


def test_slots_and_dashed_edges(plan):
    dot = plan.to_dot()
    assert plan.slots
    for q in plan.slots:
        assert f'label="slot {plan.names[q]}", shape="cylinder"' in dot
    reads = sum(1 for ph in plan.phases for op in ph.ops for r in op.reads if r.source == "slot")
    writes = sum(len(op.writes) for ph in plan.phases for op in ph.ops)
    assert reads and writes
    dashed = [e for e in _edges(dot) if 'style="dashed"' in e]
    assert len(dashed) == reads + writes
    assert sum(1 for e in dashed if e.startswith("slot")) == reads
    assert sum(1 for e in dashed if re.match(r"p\d+_op\d+ -> slot\d+", e)) == writes
    # fresh and input edges are solid
    assert all("dashed" not in e for e in _edges(dot) if "slot" not in e)


def test_colours_follow_cadence(plan):
    dot = plan.to_dot()
    colors = _visualize.cadence_colors(plan)
    cads = sorted({plan.cadence_of(m.label) for m in plan.modules})
    assert list(colors) == cads
    assert list(colors.values()) == list(_visualize.PALETTE[: len(cads)])
    for c, col in colors.items():
        legend = rf'label="{re.escape(c)}", shape="box", style="rounded,filled", fillcolor="{col}"'
        assert re.search(legend, dot)
    for ph in plan.phases:  # each module op is filled with its module's cadence colour
        for op in ph.ops:
            if op.role == "module":
                line = next(x for x in dot.splitlines() if f'tooltip="{op.name} ' in x)
                assert f'fillcolor="{colors[plan.cadence_of(op.name)]}"' in line
    # providers are grey
    for ph in plan.phases:
        for op in ph.ops:
            if op.role == "provider":
                grey = _visualize.PROVIDER_FILL
                assert f'label="{op.name}", shape="box", style="filled", fillcolor="{grey}"' in dot


def test_deterministic_across_permuted_compiles(plan):
    mods = _mods()
    a = cp.compile_plan(mods, name="viz")
    b = cp.compile_plan(list(reversed(mods)), name="viz")
    c = cp.compile_plan(mods[3:] + mods[:3], name="viz")
    assert a.to_dot() == b.to_dot() == c.to_dot() == plan.to_dot()


def test_quotes_and_backslashes_are_escaped():
    mods = [Toy(name="m", reads=("grad",), makes=("update",), attrs=(("note", 'say "hi" \\ bye'),))]
    dot = cp.compile_plan(mods, name='q"uote').to_dot()
    assert 'digraph "plan q\\"uote"' in dot
    assert 'note=say \\"hi\\" \\\\ bye' in dot


def test_render_without_path_returns_dot(plan):
    assert _visualize.render(plan) == plan.to_dot() == plan.visualize()


def test_render_dot_file(plan, tmp_path):
    out = tmp_path / "plan.dot"
    src = plan.visualize(str(out))
    assert out.read_text(encoding="utf-8") == src == plan.to_dot()
    other = tmp_path / "plan.txt"
    plan.visualize(other, format="dot")
    assert other.read_text(encoding="utf-8") == src


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
def test_render_svg_with_graphviz(plan, tmp_path):
    out = tmp_path / "plan.svg"
    src = plan.visualize(str(out))
    assert src == plan.to_dot()
    text = out.read_text(encoding="utf-8")
    assert "<svg" in text
    for ph in plan.phases:
        assert f"phase {ph.index}" in text
    # escaped labels are valid DOT
    mods = [Toy(name="m", reads=("grad",), makes=("update",), attrs=(("note", 'say "hi" \\ bye'),))]
    cp.compile_plan(mods, name='q"uote').visualize(tmp_path / "quote.svg")
    assert "<svg" in (tmp_path / "quote.svg").read_text(encoding="utf-8")


def test_render_png_with_matplotlib_fallback(plan, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(_visualize.shutil, "which", lambda *a, **k: None)
    out = tmp_path / "plan.png"
    src = plan.visualize(str(out))
    assert src == plan.to_dot()
    assert out.exists()
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_matplotlib_fallback_unplanned_and_no_slots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(_visualize.shutil, "which", lambda *a, **k: None)
    unplanned = cp.compile_plan(_mods(), name="viz", optimize=False)
    unplanned.visualize(tmp_path / "u.png")
    assert (tmp_path / "u.png").read_bytes()[:8] == PNG_MAGIC
    simple = cp.compile_plan([Toy(name="sgd", reads=("grad",), makes=("update",))], name="sgd")
    assert not simple.slots
    simple.visualize(tmp_path / "s.svg")
    assert "<svg" in (tmp_path / "s.svg").read_text(encoding="utf-8")


def test_neither_graphviz_nor_matplotlib(plan, tmp_path, monkeypatch):
    monkeypatch.setattr(_visualize.shutil, "which", lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        plan.visualize(tmp_path / "plan.png")
    assert not (tmp_path / "plan.png").exists()


def test_unknown_format(plan, tmp_path):
    with pytest.raises(ValueError, match="gif"):
        plan.visualize(tmp_path / "plan.png", format="gif")
    with pytest.raises(ValueError, match="gif"):
        plan.visualize(tmp_path / "plan.gif")
    with pytest.raises(ValueError, match="svg, png, dot"):
        plan.visualize(tmp_path / "plan")
    assert not any(tmp_path.iterdir())


def test_graphviz_failure_raises_runtime_error(plan, tmp_path, monkeypatch):
    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, b"", b"Error: syntax error in line 1")

    monkeypatch.setattr(_visualize.shutil, "which", lambda *a, **k: "/usr/bin/dot")
    monkeypatch.setattr(_visualize.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="syntax error in line 1"):
        plan.visualize(tmp_path / "plan.svg")


def test_does_not_import_jax():
    # `import curvplan` pulls in the JAX half, so check the module's own imports instead
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(_visualize))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "shutil", "subprocess", "dataclasses", "pathlib", "typing", "curvplan",
                        "networkx", "matplotlib"}, imported
    internal = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    # only the pure-Python halves of curvplan (the planner import is for type checking only)
    assert all(m.split(".")[:2] in (["curvplan", "ir"], ["curvplan", "planner"]) for m in internal
               if m.startswith("curvplan")), internal
