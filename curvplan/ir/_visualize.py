"""Pictures of a plan: Graphviz DOT source, rendered with ``dot`` or, failing that, with matplotlib.

Each phase is drawn as a box of its own: the ops it runs (providers grey, modules coloured by their
effective cadence), the values they pass each other (ellipses) and the inputs they read (plain text).
Carried state lives outside the phases: one cylinder per slot, with dashed edges from the ops that write
it and to the ops that read the carried value on a later step.

Pure Python (stdlib + networkx); matplotlib is imported only when it is needed. Never imports JAX.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvplan.ir._quantity import Quantity
from curvplan.ir._schedule import Op, format_attrs

Plan = Any  # duck-typed: curvplan.planner.Plan (ir must not import the planner)

FORMATS = ("svg", "png", "dot")

# Paul Tol's "light" scheme (colour-blind safe, readable with black text), its pale grey left out: grey is
# the providers' colour.
PALETTE = ("#77AADD", "#EE8866", "#EEDD88", "#FFAABB", "#99DDFF", "#44BB99", "#BBCC33", "#AAAA00")
PROVIDER_FILL = "#D9D9D9"
PROVIDER_LINE = "#737373"
SLOT_FILL = "#FFFFFF"
CARRIED = "#555555"
FONT = "Helvetica"


# -- the model both renderers draw ---------------------------------------------------------------------
@dataclass
class _Node:
    id: str
    kind: str  # "op" | "value" | "input"
    label: str
    fill: str = ""
    op: Op | None = None


@dataclass
class _PhaseView:
    index: int
    title: str
    nodes: list[_Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)  # solid, inside the phase
    slot_reads: list[tuple[int, str]] = field(default_factory=list)  # (slot number, op node id)
    slot_writes: list[tuple[str, int]] = field(default_factory=list)  # (op node id, slot number)


def _callee(op: Op) -> str:
    # providers by name: private copies in the unplanned baseline are ``rule/module``
    return op.name if op.name == op.op or op.role == "provider" else f"{op.op}:{op.name}"


def _op_label(op: Op) -> str:
    lines = [_callee(op)]
    if op.attrs:
        lines.append(format_attrs(op.attrs))
    if op.guard:
        lines.append(f"if {op.guard}")
    return "\n".join(lines)


def _cadence(plan: Plan, op: Op) -> str | None:
    if op.role != "module":
        return None
    try:
        return plan.cadence_of(op.name)
    except KeyError:  # an op whose name is not a module label: colour it as unknown
        return "?"


def cadence_colors(plan: Plan) -> dict[str, str]:
    """Effective cadence (text) -> fill colour, assigned in sorted order of the cadences the plan runs."""
    cads = {_cadence(plan, op) for ph in plan.phases for op in ph.ops}
    cads.discard(None)
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(sorted(cads))}


def _views(plan: Plan) -> tuple[list[_PhaseView], dict[Quantity, int], dict[str, str]]:
    colors = cadence_colors(plan)
    names = plan.names
    slot_no: dict[Quantity, int] = {q: i for i, q in enumerate(plan.slots)}
    views = []
    for ph in plan.phases:
        provs = ", ".join(ph.providers) if ph.providers else "-"
        view = _PhaseView(ph.index, f"phase {ph.index} {ph.header} [{provs}]")
        p = f"p{ph.index}"
        values: dict[Quantity, str] = {}
        inputs: dict[Quantity, str] = {}

        def value(q: Quantity) -> str:
            if q not in values:
                values[q] = f"{p}_v{len(values)}"
                view.nodes.append(_Node(values[q], "value", names[q]))
            return values[q]

        def input_(q: Quantity) -> str:
            if q not in inputs:
                inputs[q] = f"{p}_in{len(inputs)}"
                view.nodes.append(_Node(inputs[q], "input", names[q]))
            return inputs[q]

        for j, op in enumerate(ph.ops):
            oid = f"{p}_op{j}"
            cad = _cadence(plan, op)
            fill = PROVIDER_FILL if cad is None else colors[cad]
            # reads first, so inputs and values appear in the text before the op that uses them
            read_ids = []
            for r in op.reads:
                if r.source == "slot":
                    if r.node in slot_no:
                        view.slot_reads.append((slot_no[r.node], oid))
                    else:  # not listed as a slot (should not happen): show it as an input
                        read_ids.append(input_(r.node))
                elif r.source == "input":
                    read_ids.append(input_(r.node))
                else:
                    read_ids.append(value(r.node))
            view.nodes.append(_Node(oid, "op", _op_label(op), fill, op))
            view.edges += [(rid, oid) for rid in read_ids]
            for q in op.outputs:
                view.edges.append((oid, value(q)))
            for q in op.writes:
                if q in slot_no:
                    view.slot_writes.append((oid, slot_no[q]))
        views.append(view)
    return views, slot_no, colors


# -- DOT --------------------------------------------------------------------------------------------------
def _s(text: str) -> str:
    """A DOT double-quoted string (quotes and backslashes escaped, newlines as ``\\n``)."""
    esc = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{esc}"'


def _attrs(**kw: Any) -> str:
    return "[" + ", ".join(f"{k}={_s(v)}" for k, v in kw.items()) + "]"


def _head(plan: Plan) -> str:
    return str(plan).split("\n", 1)[0]


def plan_to_dot(plan: Plan) -> str:
    """The plan as Graphviz DOT source (deterministic: equal plans give identical text).

    One ``cluster_<i>`` per phase, one cylinder per carried slot outside the clusters (dashed edges from
    the ops that write it and to the ops that read it carried), and a legend mapping colours to cadences.
    """
    views, slot_no, colors = _views(plan)
    out = [
        f"digraph {_s('plan ' + plan.name)} {{",
        "  graph " + _attrs(rankdir="LR", fontname=FONT, fontsize=12, label=_head(plan), labelloc="t",
                            labeljust="l", nodesep="0.12", ranksep="0.3", newrank="true",
                            pad="0.2") + ";",
        "  node " + _attrs(fontname=FONT, fontsize=9, height="0.3", margin="0.08,0.03") + ";",
        "  edge " + _attrs(fontname=FONT, fontsize=8, arrowsize="0.6", color="#4D4D4D") + ";",
    ]
    for view in views:
        out.append(f"  subgraph cluster_{view.index} {{")
        out.append("    graph " + _attrs(label=view.title, style="rounded", color="#8C8C8C", fontsize=10,
                                         labeljust="l", margin="10") + ";")
        for n in view.nodes:
            if n.kind == "op":
                provider = n.op is not None and n.op.role == "provider"
                a = dict(label=n.label, shape="box", style="filled" if provider else "rounded,filled",
                         fillcolor=n.fill, color=PROVIDER_LINE if provider else "#333333")
                if n.op is not None and n.op.role == "module":
                    a["tooltip"] = f"{n.op.name} {_cadence(plan, n.op)}"
            elif n.kind == "value":
                a = dict(label=n.label, shape="ellipse", fontsize=8, height="0.25", margin="0.04,0.02")
            else:
                a = dict(label=n.label, shape="plaintext", fontsize=8, fontcolor="#4D4D4D", height="0.2",
                         margin="0.02,0.01")
            out.append(f"    {n.id} {_attrs(**a)};")
        for a, b in view.edges:
            out.append(f"    {a} -> {b};")
        out.append("  }")
    names = plan.names
    for q, i in slot_no.items():
        out.append(f"  slot{i} " + _attrs(label=f"slot {names[q]}", shape="cylinder", style="filled",
                                          fillcolor=SLOT_FILL, fontsize=8, height="0.3") + ";")
    if slot_no:
        # all slots in the last column: writes flow right into them, carried reads loop back
        out.append("  { rank=sink; " + " ".join(f"slot{i};" for i in slot_no.values()) + " }")
    for view in views:
        for oid, i in view.slot_writes:
            out.append(f"  {oid} -> slot{i} " + _attrs(style="dashed", color=CARRIED) + ";")
        for i, oid in view.slot_reads:
            # the read happens on a later step: keep it out of the ranking
            out.append(f"  slot{i} -> {oid} " + _attrs(style="dashed", color=CARRIED, constraint="false")
                       + ";")
    out.append("  subgraph cluster_legend {")
    out.append("    graph " + _attrs(label="cadence", style="rounded", color="#BFBFBF", fontsize=9,
                                     labeljust="l") + ";")
    legend = [("legend_provider", "provider", PROVIDER_FILL, "filled")]
    legend += [(f"legend_{i}", c, col, "rounded,filled") for i, (c, col) in enumerate(colors.items())]
    for lid, text, col, style in legend:
        out.append(f"    {lid} " + _attrs(label=text, shape="box", style=style, fillcolor=col, fontsize=8,
                                          height="0.22") + ";")
    if slot_no:
        out.append("    legend_carried " + _attrs(label="- - -  carried state", shape="plaintext", fontsize=8,
                                                  fontcolor=CARRIED, height="0.2") + ";")
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


# -- rendering ----------------------------------------------------------------------------------------------
def render(plan: Plan, path: str | Path | None = None, format: str | None = None) -> str:
    """Returns the DOT source; with ``path``, also writes the picture there.

    The format is ``format`` or ``path``'s suffix: ``svg``, ``png`` or ``dot`` (the source itself).
    Pictures are drawn by Graphviz's ``dot`` when it is on the PATH, otherwise by matplotlib.
    """
    src = plan_to_dot(plan)
    if path is None:
        return src
    path = Path(path)
    fmt = (format or path.suffix).lower().lstrip(".")
    if fmt not in FORMATS:
        given = f"format {format!r}" if format else f"suffix {path.suffix!r} of {str(path)!r}"
        raise ValueError(f"cannot draw a plan as {given}: use one of {', '.join(FORMATS)} "
                         "(a .svg/.png/.dot path, or format='svg'/'png'/'dot')")
    if fmt == "dot":
        path.write_text(src, encoding="utf-8")
        return src
    dot = shutil.which("dot")
    if dot is not None:
        res = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=src.encode("utf-8"),
                             capture_output=True)
        if res.returncode != 0:
            err = res.stderr.decode("utf-8", "replace").strip()
            raise RuntimeError(
                f"graphviz `dot -T{fmt}` failed (exit {res.returncode}) drawing {str(path)!r}:\n{err}"
            )
        return src
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"cannot draw {str(path)!r}: neither Graphviz nor matplotlib is installed; install graphviz "
            "(`apt-get install graphviz`, or `brew install graphviz`) "
            "or matplotlib (`pip install matplotlib`), "
            "or write the DOT source with a .dot path"
        ) from None
    _draw_matplotlib(plan, path, fmt)
    return src


@dataclass
class _Layout:
    layer: dict[str, int]  # node id -> column (dummy ids start with "~")
    rows: list[list[str]]  # the columns, each ordered top to bottom
    edges: list[tuple[list[str], bool]]  # (path of node ids, dummies in between; carried)


def _layout(view: _PhaseView) -> _Layout:
    """A small Sugiyama-style layered layout of one phase, left to right.

    Slots are drawn inside the phase as a read node (left of the reader) and a write node (right of the
    writer). Long edges run through dummy nodes so that they do not cross the boxes they pass.
    """
    import networkx as nx

    g = nx.DiGraph()
    for n in view.nodes:
        g.add_node(n.id)
    raw = [(a, b, False) for a, b in view.edges]
    raw += [(f"s{i}_in", oid, True) for i, oid in view.slot_reads]
    raw += [(oid, f"s{i}_out", True) for oid, i in view.slot_writes]
    for a, b, _ in raw:
        g.add_edge(a, b)
    layer: dict[str, int] = {}
    for k, gen in enumerate(nx.topological_generations(g)):
        for n in gen:
            layer[n] = k
    # sources (inputs, carried reads) sit just left of their first reader, not all in column 0
    for n in g.nodes:
        if g.in_degree(n) == 0 and g.out_degree(n) > 0:
            layer[n] = min(layer[s] for s in g.successors(n)) - 1
    used = sorted(set(layer.values()))
    layer = {n: used.index(k) for n, k in layer.items()}  # drop emptied columns
    seq = {n.id: i for i, n in enumerate(view.nodes)}
    nodes = sorted(g.nodes, key=lambda n: (layer[n], seq.get(n, len(seq)), n))
    # split long edges with dummies
    h = nx.DiGraph()
    h.add_nodes_from(nodes)
    edges = []
    for e, (a, b, carried) in enumerate(raw):
        path = [a] + [f"~{e}_{k}" for k in range(layer[a] + 1, layer[b])] + [b]
        for k, d in enumerate(path[1:-1]):
            layer[d] = layer[a] + 1 + k
        nx.add_path(h, path)
        edges.append((path, carried))
    depth = max(layer.values(), default=0) + 1
    rows: list[list[str]] = [[] for _ in range(depth)]
    for n in h.nodes:  # insertion order: real nodes in schedule order, then dummies edge by edge
        rows[layer[n]].append(n)

    def crossings() -> int:
        pos = {n: i for row in rows for i, n in enumerate(row)}
        total = 0
        for k in range(depth - 1):
            es = [(pos[a], pos[b]) for a in rows[k] for b in h.successors(a)]
            total += sum(1 for i, (a1, b1) in enumerate(es) for a2, b2 in es[i + 1:]
                         if (a1 - a2) * (b1 - b2) < 0)
        return total

    best, best_rows = crossings(), [list(r) for r in rows]
    for sweep in range(12):  # barycentre sweeps, keeping the best ordering seen
        forward = sweep % 2 == 0
        for k in (range(1, depth) if forward else range(depth - 2, -1, -1)):
            pos = {n: i for row in rows for i, n in enumerate(row)}

            def bary(n: str) -> float:
                nbrs = list(h.predecessors(n)) if forward else list(h.successors(n))
                return sum(pos[m] for m in nbrs) / len(nbrs) if nbrs else pos[n]

            rows[k].sort(key=lambda n: (bary(n), pos[n]))
        c = crossings()
        if c < best:
            best, best_rows = c, [list(r) for r in rows]
    return _Layout(layer, best_rows, edges)


def _draw_matplotlib(plan: Plan, path: Path, fmt: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    views, slot_no, colors = _views(plan)
    names = plan.names
    slot_label = {i: f"slot {names[q]}" for q, i in slot_no.items()}
    layouts = [_layout(v) for v in views]
    fontsize = 7
    labels_len = [len(line) for v in views for n in v.nodes for line in n.label.split("\n")]
    labels_len += [len(s) + 8 for s in slot_label.values()]
    dx = max(1.1, 0.058 * max(labels_len, default=10) + 0.35)  # inches between columns
    dy = 0.42  # inches between rows
    depth = max((len(lo.rows) for lo in layouts), default=1)
    heights = [max((len(r) for r in lo.rows), default=1) for lo in layouts]
    width = max(4.0, depth * dx + 0.4)
    total = sum(h * dy + 0.55 for h in heights) + 0.6
    fig = Figure(figsize=(width, total))
    if not views:
        fig.text(0.5, 0.5, f"{_head(plan)}\n(no phases)", ha="center", va="center", fontsize=9)
        fig.savefig(path, format=fmt)
        return
    axes = fig.subplots(len(views), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, view, lo in zip(axes, views, layouts):
        ax.set_axis_off()
        ax.set_title(view.title, loc="left", fontsize=fontsize + 1.5)
        nmax = max(len(r) for r in lo.rows)
        xy = {}
        for k, row in enumerate(lo.rows):
            off = (nmax - len(row)) / 2
            for i, n in enumerate(row):
                xy[n] = (k * dx, -(i + off) * dy)
        ax.set_xlim(-dx / 2, (depth - 0.5) * dx)
        ax.set_ylim(-(nmax - 0.5) * dy, 0.5 * dy)
        by_id = {n.id: n for n in view.nodes}
        artists = {}
        for nid, (x, y) in xy.items():
            if nid.startswith("~"):
                continue
            node = by_id.get(nid)
            kw: dict[str, Any] = dict(ha="center", va="center", fontsize=fontsize, zorder=3)
            if node is None:  # slot read (left) or write (right)
                i = int(nid[1:].split("_")[0])
                text = slot_label[i] + (" (read)" if nid.endswith("_in") else " (write)")
                kw["bbox"] = dict(boxstyle="round,pad=0.3", fc=SLOT_FILL, ec=CARRIED, ls="--", lw=0.8)
            elif node.kind == "op":
                text = node.label
                provider = node.op is not None and node.op.role == "provider"
                kw["bbox"] = dict(boxstyle="square,pad=0.35" if provider else "round,pad=0.35", fc=node.fill,
                                  ec=PROVIDER_LINE if provider else "#333333", lw=0.8)
            elif node.kind == "value":
                text = node.label
                kw["bbox"] = dict(boxstyle="round,pad=0.25,rounding_size=0.6", fc="white", ec="#999999",
                                  lw=0.6)
            else:
                text = node.label
                kw.update(color="#4D4D4D", style="italic")
                kw["bbox"] = dict(boxstyle="square,pad=0.15", fc="white", ec="none")
            artists[nid] = ax.text(x, y, text, **kw)
        for chain, carried in lo.edges:
            color = CARRIED if carried else "#4D4D4D"
            ls = "--" if carried else "-"
            a, b = chain[0], chain[-1]
            mids = [xy[d] for d in chain[1:-1]]
            line = dict(color=color, ls=ls, lw=0.7)
            start: Any = ((1, 0.5), artists[a])
            for p in mids:  # plain segments up to the last dummy
                ax.annotate("", xy=p, xycoords="data", xytext=start[0], textcoords=start[1], zorder=1,
                            arrowprops=dict(arrowstyle="-", shrinkA=4, shrinkB=0, **line))
                start = (p, "data")
            ax.annotate("", xy=(0, 0.5), xycoords=artists[b], xytext=start[0], textcoords=start[1], zorder=1,
                        arrowprops=dict(arrowstyle="-|>", mutation_scale=7, shrinkA=0 if mids else 4,
                                        shrinkB=4, **line))
    handles = [Patch(fc=PROVIDER_FILL, ec=PROVIDER_LINE, label="provider")]
    handles += [Patch(fc=col, ec="#333333", label=c) for c, col in colors.items()]
    handles += [Line2D([], [], color=CARRIED, ls="--", lw=0.8, label="carried (slot)")]
    fig.suptitle(_head(plan), fontsize=fontsize + 3, x=0.01, ha="left")
    fig.legend(handles=handles, loc="upper right", fontsize=fontsize, ncol=min(len(handles), 6),
               frameon=False, title="module cadence", title_fontsize=fontsize)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / total))
    fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight", pad_inches=0.15)
