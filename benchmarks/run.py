"""The benchmark runner: suites of measurements written as JSON + Markdown + PNG under ``benchmarks/results``.

    python -m benchmarks.run quick            # seconds: smoke subset (CI), checks the output is well formed
    python -m benchmarks.run all              # minutes: ablation + peers + time-to-target; updates README
    python -m benchmarks.run ablation|peers|kfac|vs-adamw|ttt|geometry [--workload w1] [--steps 30] [--repeats 3]

Suites:
- ``ablation``: each composition with something to share, planned vs ``compile_plan(..., optimize=False)``:
  per-step time ratio (A/B interleaved), FLOP ratio (XLA ``cost_analysis``), and which passes removed work.
- ``peers``: each curvplan method vs the peer with the same settings (Somax v1, optax).
- ``kfac``: curvplan K-FAC vs kfac-jax 0.0.8 on W1 (kfac-jax runs in its own venv, `make bench-peers`).
- ``vs-adamw``: amortized per-step time of the Kronecker / geometry methods vs optax.adamw on W1 and W3.
- ``ttt``: time- and steps-to-target vs AdamW over seeds (target: AdamW's held-out loss at 60% of its budget).
- ``geometry``: W3 adaptive Schatten-p vs Muon per-step time; held-out loss after a fixed budget (3 seeds).
"""

from __future__ import annotations

import os

# XLA:CPU already runs independent LAPACK calls on its own thread pool; OpenBLAS's threads (scipy's copy, which
# jaxlib's eigh/qr call into) then oversubscribe the cores and refresh steps vary 2-4x run to run. Set before
# jax loads; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import curvplan as cp  # noqa: E402
from benchmarks import measure  # noqa: E402
from benchmarks.optimizers import ADAMW_LR, METHODS, adamw, curvplan_runner, make_runner  # noqa: E402
from benchmarks.workloads import WorkloadUnavailable, get_workload  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
README = pathlib.Path(__file__).parent.parent / "README.md"


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _progress(done: int, total: int, what: str) -> None:
    width = 24
    filled = int(width * done / max(total, 1))
    _log(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what}")


# -- explanations -------------------------------------------------------------------------------------------
def explain(planned, unplanned) -> list[str]:
    """Which passes removed work: provider calls per step, planned (by phase) vs unplanned."""
    from curvplan.ir import PROVIDERS

    u_provs = [op.op for op in unplanned.phases[0].ops if op.role == "provider"]
    u_cost = sum(PROVIDERS[p].cost for p in u_provs)
    lines = [f"unplanned: every step runs {len(u_provs)} provider call(s) [{', '.join(u_provs)}] "
             f"(cost {u_cost:.1f} gradient-equivalents; one per consuming module, cadences as lax.cond)"]
    steps = range(planned.prefix, planned.prefix + planned.period)
    avg = 0.0
    for ph in planned.phases:
        n = sum(planned.phase_of(t) == ph.index for t in steps)
        c = sum(PROVIDERS[p].cost for p in ph.providers)
        avg += c * n / planned.period
        if n:
            lines.append(f"planned phase {ph.index} {ph.header} ({n}/{planned.period} steps): "
                         f"[{', '.join(ph.providers)}] (cost {c:.1f})")
    if len(u_provs) > max(len(ph.providers) for ph in planned.phases):
        lines.append("dedup: modules share one provider call instead of one each")
    if len(planned.phases) > 1:
        lines.append("per-phase provider selection: off-cadence phases run cheaper providers")
    lines.append(f"provider cost per step: {avg:.2f} planned vs {u_cost:.2f} unplanned")
    return lines


# -- suites -------------------------------------------------------------------------------------------------
def _workload(m: str, override: str | None):
    return get_workload(override or METHODS[m].workload)


def suite_ablation(workload: str | None, steps: int, repeats: int, methods: list[str] | None = None) -> list[dict]:
    names = [m for m in (methods or METHODS) if METHODS[m].shares]
    rows = []
    for i, m in enumerate(names):
        w = _workload(m, workload)
        if w.loss_kind not in METHODS[m].losses:
            continue
        _progress(i, len(names), f"ablation {m} on {w.name}")
        a, b = make_runner(f"cp:{m}", w), make_runner(f"cp:{m}:unplanned", w)
        times = measure.interleaved_step_times({"planned": a, "unplanned": b}, w, steps=steps, repeats=repeats,
                                               progress=_log)
        loop = measure.interleaved_scan_times({"planned": a, "unplanned": b}, w, steps=steps, repeats=repeats)
        ca, cb = measure.cost(a, w), measure.cost(b, w)
        low = measure.unplanned_flops_lower_bound(b, w, range(a.plan.prefix, a.plan.prefix + a.plan.period))
        rows.append({
            "method": m, "workload": w.name, "period": a.period, "programs": a.n_programs,
            "time_planned": times["planned"], "time_unplanned": times["unplanned"],
            "time_ratio": measure.ratio_stats(times["planned"], times["unplanned"]),
            "loop_planned": loop["planned"], "loop_unplanned": loop["unplanned"],
            "loop_ratio": measure.ratio_stats(loop["planned"], loop["unplanned"]),
            "flops_planned": ca["flops"], "flops_unplanned_xla": cb["flops"], "flops_unplanned_lower": low,
            "flop_ratio": ca["flops"] / cb["flops"], "flop_ratio_vs_lower": ca["flops"] / low,
            "bytes_planned": ca["bytes"], "bytes_unplanned": cb["bytes"],
            "programs_planned": ca["programs"], "explanation": explain(a.plan, b.plan), "plan": str(a.plan),
        })
    _progress(len(names), len(names), "ablation done")
    return rows


def suite_peers(workload: str | None, steps: int, repeats: int, methods: list[str] | None = None) -> list[dict]:
    names = [m for m in (methods or METHODS) if METHODS[m].peer is not None]
    rows = []
    for i, m in enumerate(names):
        w = _workload(m, workload)
        if w.loss_kind not in METHODS[m].losses:
            continue
        _progress(i, len(names), f"peers {m} on {w.name}")
        try:
            peer = make_runner(f"peer:{m}", w)
        except ImportError as e:
            rows.append({"method": m, "workload": w.name, "error": f"peer not installed: {e}"})
            continue
        ours = make_runner(f"cp:{m}", w)
        times = measure.interleaved_step_times({"curvplan": ours, "peer": peer}, w, steps=steps, repeats=repeats,
                                               progress=_log)
        co, cpeer = measure.cost(ours, w), measure.cost(peer, w)
        row = {
            "method": m, "workload": w.name, "peer": peer.label, "time_curvplan": times["curvplan"],
            "time_peer": times["peer"], "time_ratio": measure.ratio_stats(times["curvplan"], times["peer"]),
            "flops_curvplan": co["flops"], "flops_peer": cpeer["flops"], "programs": ours.n_programs,
        }
        if ours.scan is not None and peer.scan is not None:
            sc = measure.interleaved_scan_times({"curvplan": ours, "peer": peer}, w, steps=steps, repeats=repeats)
            row["scan_ratio"] = measure.ratio_stats(sc["curvplan"], sc["peer"])
            row["scan_curvplan"], row["scan_peer"] = sc["curvplan"], sc["peer"]
            _log(f"{m} in a compiled loop: curvplan {sc['curvplan']['median'] * 1e3:.2f} ms, "
                 f"peer {sc['peer']['median'] * 1e3:.2f} ms")
        rows.append(row)
    _progress(len(names), len(names), "peers done")
    return rows


KFAC_WORKLOADS = ("w1", "w1-wide")
"""Where K-FAC is timed against kfac-jax (the peer script rebuilds each one's MLP, data split and batches)."""


def suite_kfac(steps: int, repeats: int, workload: str = "w1") -> list[dict]:
    """curvplan K-FAC vs kfac-jax 0.0.8 on an MLP workload, alternating processes: each repeat times one
    in-process curvplan block, then runs the peer script in its venv (which warms up, then times one block)."""
    import subprocess

    from benchmarks.optimizers import KFAC

    if workload not in KFAC_WORKLOADS:
        raise SystemExit(f"the kfac suite runs on {', '.join(KFAC_WORKLOADS)}, not {workload!r}")
    venv = pathlib.Path(__file__).parent.parent / ".venv-kfac" / "bin" / "python"
    if not venv.exists():
        return [{"method": "kfac", "workload": workload, "error": "kfac-jax venv missing: run `make bench-peers`"}]
    w = get_workload(workload)
    ours = make_runner("cp:kfac", w)
    live = measure.Live(ours, w, 0, None)
    layers = [live.params[f"layer_{i}"]["w"].shape for i in range(len(live.params))]
    sizes = [layers[0][0]] + [d_out for _, d_out in layers]  # the MLP's widths, read off its parameters
    live.run(ours.period + 2)
    script = pathlib.Path(__file__).parent / "peers" / "kfac_jax_w1.py"
    cmd = [str(venv), str(script), "--steps", str(steps), "--blocks", "1", "--inverse-every",
           str(KFAC["inverse_every"]), "--ema", str(KFAC["ema"]), "--damping", str(KFAC["damping"]),
           "--learning-rate", str(KFAC["learning_rate"]), "--batch", str(w.batch_size),
           "--sizes", ",".join(map(str, sizes))]
    n = -(-steps // ours.period) * ours.period
    mine, peer = [], []
    for rep in range(repeats):
        mine.append(live.run(n) / n)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peer.append(json.loads(out.stdout.strip().splitlines()[-1])["sec_per_step"][0])
        _log(f"{workload} repeat {rep + 1}/{repeats}: curvplan {mine[-1] * 1e3:.2f} ms, "
             f"kfac-jax {peer[-1] * 1e3:.2f} ms")

    a, b = measure.summary(mine), measure.summary(peer)
    co = measure.cost(ours, w)
    return [{"method": "kfac", "workload": workload, "peer": "kfac-jax 0.0.8 (jax 0.9.1, subprocess)",
             "time_curvplan": a, "time_peer": b, "time_ratio": measure.ratio_stats(a, b),
             "flops_curvplan": co["flops"], "flops_peer": float("nan"), "programs": ours.n_programs}]


def suite_vs_adamw(workload: str, steps: int, repeats: int, methods: list[str]) -> list[dict]:
    """Amortized per-step time of each method vs optax.adamw on one workload (A/B interleaved per method)."""
    w = get_workload(workload)
    adamw_flops = measure.cost(adamw(w), w)["flops"]
    rows = []
    for i, m in enumerate(methods):
        _progress(i, len(methods), f"{m} vs adamw on {workload}")
        runners = {"curvplan": make_runner(f"cp:{m}", w), "adamw": adamw(w)}
        if METHODS[m].peer is not None:
            runners["peer"] = METHODS[m].peer(w)
        try:
            times = measure.interleaved_step_times(runners, w, steps=steps, repeats=repeats, progress=_log)
        except Exception as e:  # noqa: BLE001 -- a failing method is a result, reported, not a crash
            rows.append({"method": m, "workload": workload, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        row = {"method": m, "workload": workload, "period": runners["curvplan"].period,
               "time_curvplan": times["curvplan"], "time_adamw": times["adamw"],
               "ratio_vs_adamw": measure.ratio_stats(times["curvplan"], times["adamw"]),
               "flop_ratio_vs_adamw": measure.cost(runners["curvplan"], w)["flops"] / adamw_flops}
        if workload in LOOP_TIMED:
            loop = measure.interleaved_scan_times({k: runners[k] for k in ("curvplan", "adamw")}, w, steps=steps,
                                                  repeats=repeats)
            row["loop_ratio_vs_adamw"] = measure.ratio_stats(loop["curvplan"], loop["adamw"])
        if "peer" in times:
            row["peer"] = runners["peer"].label
            row["ratio_vs_peer"] = measure.ratio_stats(times["curvplan"], times["peer"])
        rows.append(row)
    _progress(len(methods), len(methods), "done")
    return rows


def suite_ttt(workload: str, budget: int, seeds: int, methods: list[str], eval_every: int) -> dict:
    """AdamW runs ``budget`` steps per seed; the target is the median over seeds of its held-out loss at 60%
    of the budget; every method then trains up to ``budget`` steps (with `Method.defaults` where
    given) and stops when it reaches the target."""
    w = get_workload(workload)
    out = {"workload": workload, "budget": budget, "seeds": seeds, "curves": {}, "reached": {}}
    ref = [measure.train_curve(adamw(w), w, steps=budget, seed=s, eval_every=eval_every) for s in range(seeds)]
    at60 = int(0.6 * budget)
    target = float(np.median([min((c for c in r["curve"] if c["step"] >= at60), key=lambda c: c["step"])["eval_loss"]
                              for r in ref]))
    out["target"] = target
    names = ["adamw"] + [m for m in methods if w.loss_kind in METHODS[m].losses]
    for i, m in enumerate(names):
        _progress(i, len(names), f"time-to-target {m} on {workload} (target {target:.4f})")
        runs = []
        for s in range(seeds):
            r = adamw(w) if m == "adamw" else make_runner(f"cp:{m}:defaults", w)
            runs.append(measure.train_curve(r, w, steps=budget, seed=s, eval_every=eval_every, target=target))
        out["curves"][m] = [r["curve"] for r in runs]
        reached = [r["reached"] for r in runs]
        ok = [x for x in reached if x is not None]
        out["reached"][m] = {
            "n_reached": len(ok),
            # median over all seeds with "not reached" as +inf: defined only when most seeds reached
            "median_steps": float(np.median([x["step"] if x else np.inf for x in reached])),
            "median_time": float(np.median([x["time"] if x else np.inf for x in reached])),
            "compile_s": float(np.median([r["compile_s"] for r in runs])),
        }
    _progress(len(names), len(names), "time-to-target done")
    return out


def suite_geometry(steps: int, repeats: int, seeds: int) -> dict:
    """Issue 7 figures on W3: per-step time of adaptive Schatten-p vs Muon (curvplan and optax.contrib.muon)
    and AdamW, interleaved over whole criterion periods; then held-out loss after a fixed step budget for
    AdamW, Muon, adaptive Schatten-p and MuAdam over seeds, with the p each layer ended with."""
    g = GEOMETRY
    w = get_workload(g["workload"])
    runners = {"adaptive_schatten": make_runner("cp:adaptive_schatten", w), "muon": make_runner("cp:muon", w),
               "optax.contrib.muon": METHODS["muon"].peer(w), "adamw": adamw(w)}
    _log(f"geometry timing on {w.name}: {', '.join(runners)}")
    times = measure.interleaved_step_times(runners, w, steps=steps, repeats=repeats, progress=_log)
    pairs = [("adaptive_schatten", "muon"), ("muon", "optax.contrib.muon"), ("adaptive_schatten", "adamw"),
             ("muon", "adamw")]
    out = {"workload": w.name, "budget": g["budget"], "seeds": seeds, "times": times,
           "ratios": [{"a": a, "b": b, **measure.ratio_stats(times[a], times[b])} for a, b in pairs],
           "period": runners["adaptive_schatten"].period, "final": {}}
    names = ["adamw", *g["methods"]]
    for i, m in enumerate(names):
        _progress(i, len(names), f"{m}: {g['budget']} steps x {seeds} seeds on {w.name}")
        runs = []
        for s in range(seeds):
            r = adamw(w) if m == "adamw" else curvplan_runner(m, getattr(cp.presets, m)(g["lr"][m]), w)
            res = measure.train_curve(r, w, steps=g["budget"], seed=s, eval_every=g["eval_every"])
            slots = getattr(res["live"].state, "slots", {})
            inv_p = slots.get("%schatten_inv_p")
            runs.append({"curve": res["curve"], "final_eval_loss": res["curve"][-1]["eval_loss"],
                         "p": None if inv_p is None else {k: _p_of(v) for k, v in inv_p.items()}})
        out["final"][m] = {"learning_rate": g["lr"].get(m, ADAMW_LR.get(w.name)), "runs": runs,
                           **measure.summary([x["final_eval_loss"] for x in runs])}
    _progress(len(names), len(names), "geometry done")
    return out


def _short_key(key: str) -> str:
    """``"['block_0']['fc1']['w']"`` -> ``"block_0/fc1/w"``."""
    return "/".join(part.strip("[]'\"") for part in key.split("][")) if key.startswith("[") else key


def _p_of(inv_p) -> float:
    v = float(np.asarray(inv_p))
    return float("inf") if v == 0 else 1.0 / v


# -- output -------------------------------------------------------------------------------------------------
def _fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def _finite(x):
    return x is not None and np.isfinite(x)


def markdown(result: dict) -> str:
    lines = [f"Measured {result['timestamp']} on {result['machine']['device']} "
             f"({result['machine']['cpu_count']} cores, jax {result['machine']['jax']}) with "
             f"`{result['command']}`.", ""]
    if result.get("ablation"):
        lines += ["**Planning ablation** (same composition, `optimize=True` vs `optimize=False`; per-step time "
                  "ratio median (min-max) over interleaved repeats, per host-dispatched step and inside one "
                  "compiled `lax.scan` loop; FLOPs from XLA cost analysis, per step averaged over one period)", "",
                  "| composition | workload | programs | ms/step planned | ms/step unplanned | time ratio (step) | "
                  "time ratio (loop) | FLOP ratio (vs XLA count / vs cond lower bound) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["ablation"]:
            lines.append(f"| {r['method']} | {r['workload']} | {r['programs']} | {r['time_planned']['median'] * 1e3:.2f} | "
                         f"{r['time_unplanned']['median'] * 1e3:.2f} | {_fmt_ratio(r['time_ratio'])} | "
                         f"{_fmt_ratio(r['loop_ratio'])} | {r['flop_ratio']:.3f} / {r['flop_ratio_vs_lower']:.3f} |")
        lines.append("")
    if result.get("peers"):
        lines += ["**curvplan vs peers** (same model, data, batch, dtype and settings, interleaved in one process; "
                  "\"step\": one host call per step, as a training loop runs; \"loop\": the same steps inside one "
                  "compiled `lax.scan` (curvplan's `Optimizer.run`), which takes host dispatch out)",
                  "", "| method | workload | peer | ms/step curvplan | ms/step peer | time ratio (step) | "
                  "time ratio (loop) | MFLOP/step curvplan | MFLOP/step peer |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["peers"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['workload']} | {r['error']} | | | | | | |")
                continue
            loop = _fmt_ratio(r["scan_ratio"]) if "scan_ratio" in r else "-"
            lines.append(f"| {r['method']} | {r['workload']} | {r['peer']} | {r['time_curvplan']['median'] * 1e3:.2f} | "
                         f"{r['time_peer']['median'] * 1e3:.2f} | {_fmt_ratio(r['time_ratio'])} | {loop} | "
                         f"{r['flops_curvplan'] / 1e6:.2f} | {r['flops_peer'] / 1e6:.2f} |")
        lines.append("")
    if result.get("vs_adamw"):
        lines += ["**Amortized per-step time vs optax.adamw** (same workload and batch; interleaved; whole "
                  "refresh periods; \"loop\": inside one compiled `lax.scan`; FLOP ratio from XLA cost analysis: "
                  "the compute floor of the time ratio)", "",
                  "| method | workload | period | ms/step | ms/step adamw | ratio vs adamw (step) | ratio vs adamw "
                  "(loop) | FLOP ratio vs adamw | ratio vs peer |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["vs_adamw"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['workload']} | failed: {r['error']} | | | | | | |")
                continue
            peer = f"{_fmt_ratio(r['ratio_vs_peer'])} ({r['peer']})" if "peer" in r else "-"
            loop = _fmt_ratio(r["loop_ratio_vs_adamw"]) if "loop_ratio_vs_adamw" in r else "-"
            lines.append(f"| {r['method']} | {r['workload']} | {r['period']} | {r['time_curvplan']['median'] * 1e3:.2f} | "
                         f"{r['time_adamw']['median'] * 1e3:.2f} | {_fmt_ratio(r['ratio_vs_adamw'])} | {loop} | "
                         f"{r['flop_ratio_vs_adamw']:.2f} | {peer} |")
        lines.append("")
    if result.get("geometry"):
        g = result["geometry"]
        t = g["times"]
        lines += [f"**Geometry on {g['workload']}**: per-step time, interleaved over whole criterion periods "
                  f"({g['period']} steps; the criterion refreshes once per period)", "",
                  "| optimizer | ms/step |", "|---|---|"]
        lines += [f"| {k} | {v['median'] * 1e3:.2f} |" for k, v in t.items()]
        lines += ["", "| ratio | median (min-max) |", "|---|---|"]
        lines += [f"| {r['a']} / {r['b']} | {_fmt_ratio(r)} |" for r in g["ratios"]]
        lines += ["", f"Held-out loss after {g['budget']} steps (median (min-max) over {g['seeds']} seeds):", "",
                  "| optimizer | final held-out loss | p per layer at the end (seed 0) |", "|---|---|---|"]
        for m, r in g["final"].items():
            p = r["runs"][0]["p"]
            ps = ", ".join(f"{_short_key(k)}: {'∞' if v == float('inf') else f'{v:g}'}" for k, v in p.items()) if p else "-"
            lines.append(f"| {m} (lr {r['learning_rate']:g}) | {r['median']:.4f} ({r['min']:.4f}-{r['max']:.4f}) | {ps} |")
        lines.append("")
    for t in result.get("ttt", []):
        lines += [f"**Time to target on {t['workload']}** (target held-out loss {t['target']:.4f} = AdamW's at 60% "
                  f"of {t['budget']} steps; median over {t['seeds']} seeds; compile time excluded)", "",
                  "| optimizer | reached | median steps | median time (s) | time vs AdamW | compile (s) |",
                  "|---|---|---|---|---|---|"]
        base = t["reached"]["adamw"]["median_time"]
        for m, r in t["reached"].items():
            reached = _finite(r["median_time"])
            lines.append(f"| {m} | {r['n_reached']}/{t['seeds']} | {r['median_steps']:.0f} | "
                         f"{r['median_time']:.2f} | {r['median_time'] / base:.2f} | {r['compile_s']:.1f} |" if reached
                         else f"| {m} | {r['n_reached']}/{t['seeds']} | not reached | not reached | - | "
                              f"{r['compile_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plots(result: dict, stem: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    bars = [(f"{r['method']} (planned/unplanned)", r["time_ratio"]) for r in result.get("ablation", [])]
    bars += [(f"{r['method']} (vs {r['peer']})", r["time_ratio"]) for r in result.get("peers", []) if "error" not in r]
    bars += [(f"{r['method']} on {r['workload']} (vs adamw)", r["ratio_vs_adamw"]) for r in result.get("vs_adamw", [])
             if "error" not in r]
    if bars:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
        y = np.arange(len(bars))
        med = [b[1]["median"] for b in bars]
        err = [[m - b[1]["min"] for m, b in zip(med, bars)], [b[1]["max"] - m for m, b in zip(med, bars)]]
        ax.barh(y, med, xerr=err, color="#4c72b0")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
        ax.set_xlabel("per-step time ratio (lower is better; min-max whiskers)")
        fig.tight_layout()
        path = stem.with_name(stem.name + "_ratios.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    for t in result.get("ttt", []):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for i, (m, curves) in enumerate(t["curves"].items()):
            c = curves[0]
            for ax, key in zip(axes, ("step", "time")):
                ax.plot([p[key] for p in c], [p["eval_loss"] for p in c], label=m, color=f"C{i}")
        for ax, key in zip(axes, ("steps", "wall time (s, compile excluded)")):
            ax.axhline(t["target"], color="k", ls=":", lw=0.8)
            ax.set_xlabel(key)
            ax.set_ylabel("held-out loss")
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{t['workload']} (seed 0; target dotted)")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{t['workload']}_loss.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def validate(result: dict) -> None:
    """Raises if a result is not well formed (what `make bench-quick` checks; never timing values)."""
    for key in ("suite", "command", "machine", "timestamp"):
        assert key in result, f"result lacks {key!r}"
    for r in result.get("ablation", []):
        assert len(r["time_planned"]["samples"]) >= 1 and all(s > 0 for s in r["time_planned"]["samples"]), r
        assert r["flops_planned"] > 0 and r["flops_unplanned_xla"] > 0, r
        assert r["programs"] >= 1 and r["explanation"], r
        assert all(x > 0 for x in r["loop_planned"]["samples"] + r["loop_unplanned"]["samples"]), r
    for r in result.get("peers", []):
        assert "error" in r or r["time_ratio"]["median"] > 0, r
    for t in result.get("ttt", []):
        assert np.isfinite(t["target"]) and "adamw" in t["reached"], t


def update_readme(md: str, plot: str | None) -> None:
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    text = README.read_text()
    if start not in text:
        return
    body = md + (f"\n![loss curves](benchmarks/results/{plot})\n" if plot else "")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{body}\n{end}{tail}")


QUICK = dict(workload="w1", steps=4, repeats=2, methods=["hutchinson_every_10"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=["quick", "ablation", "peers", "kfac", "vs-adamw", "ttt", "geometry", "all"])
    ap.add_argument("--workload", default=None, help="override each method's workload")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per block (rounded up to whole periods)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--readme", action="store_true", help="rewrite the README's benchmark section")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"suite": args.suite, "command": "python -m benchmarks.run " + " ".join(argv or sys.argv[1:]),
              "machine": measure.machine(), "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    if args.suite == "quick":
        result["ablation"] = suite_ablation(QUICK["workload"], QUICK["steps"], QUICK["repeats"], QUICK["methods"])
        result["ttt"] = [suite_ttt("w4", budget=40, seeds=2, methods=QUICK["methods"], eval_every=10)]
    if args.suite in ("ablation", "all"):
        result["ablation"] = suite_ablation(args.workload, args.steps, args.repeats, args.methods)
    if args.suite in ("peers", "all"):
        result["peers"] = suite_peers(args.workload, args.steps, args.repeats, args.methods)
    if args.suite in ("kfac", "all"):
        chosen = [args.workload] if args.suite == "kfac" and args.workload else [  # `all`: those it covers
            wl for wl in KFAC_WORKLOADS if args.workload in (None, wl)]
        for wl in chosen:
            result["peers"] = result.get("peers", []) + suite_kfac(args.steps, args.repeats, wl)
    if args.suite in ("vs-adamw", "all"):
        result["vs_adamw"] = []
        for wl, methods in VS_ADAMW.items():
            result["vs_adamw"] += suite_vs_adamw(wl, args.steps, args.repeats, args.methods or methods)
    if args.suite in ("ttt", "all"):
        result["ttt"] = []
        for wl, (budget, every, methods) in TTT.items():
            if args.workload and wl != args.workload:
                continue
            try:
                seeds = 3 if wl in ("w3", "w1-wide") else args.seeds  # W3 ~40 ms/step here, the wide MLP ~25
                result["ttt"].append(suite_ttt(wl, budget, seeds, args.methods or methods, every))
            except WorkloadUnavailable as e:
                _log(f"skipping {wl}: {e}")
    if args.suite == "geometry":  # its own results file (benchmarks/results/geometry.*), not part of `all`
        result["geometry"] = suite_geometry(args.steps, args.repeats, 3)
    result["peak_rss_mb"] = measure.peak_rss_mb()
    result["elapsed_s"] = time.perf_counter() - t0
    validate(result)
    stem = out / args.suite
    md = markdown(result)
    result["plots"] = plots(result, stem)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    _log(f"wrote {stem}.json, {stem}.md, {', '.join(result['plots'])} in {result['elapsed_s']:.0f} s")
    if args.readme:
        loss_plots = [p for p in result["plots"] if p.endswith("_loss.png")]
        update_readme(md, loss_plots[0] if loss_plots else None)
    return result


LOOP_TIMED = ("w1",)
"""Workloads whose vs-adamw rows also time a compiled loop (W3's scanned programs take minutes to compile)."""

VS_ADAMW = {"w1": ["shampoo", "soap", "scao", "muon"], "w3": ["shampoo", "soap", "scao", "muon"]}
"""Issue 6/7 figures: amortized per-step time vs AdamW (and vs optax.contrib.muon for muon)."""

GEOMETRY = {"workload": "w3", "budget": 300, "eval_every": 100, "methods": ["muon", "adaptive_schatten", "muadam"],
            "lr": {"muon": 0.05, "adaptive_schatten": 0.05, "muadam": 1e-3}}
"""Issue 7 figures: adaptive Schatten-p vs Muon per-step time, and fixed-budget held-out loss (3 seeds). Learning
rates: best held-out loss after 150 steps (seed 0) of {0.02, 0.05} for Muon, {0.01, 0.02, 0.05} for adaptive
Schatten-p and {1e-3, 3e-3, 1e-2} for MuAdam; AdamW keeps `ADAMW_LR`."""

TTT = {
    "w1": (600, 20, ["gauss_newton_cg", "sophia_h", "adahessian", "kfac", "kfac_adaptive", "shampoo", "soap", "scao",
                     "muon"]),
    "w4": (1500, 50, ["levenberg_marquardt", "gauss_newton_cg", "hessian_free"]),
    "w3": (300, 50, ["muon", "shampoo", "soap", "scao", "kfac", "kfac_adaptive"]),
    "w1-wide": (300, 15, ["kfac", "kfac_adaptive", "shampoo", "soap", "muon", "sophia_h"]),
}
"""workload -> (step budget, eval every, methods) for time-to-target vs AdamW."""

if __name__ == "__main__":
    main()
