"""Scale-out suite: per-device cost of each phase program and of the state on 1 / 2 / 4 / 8 devices.

    python -m benchmarks.scale [--devices 1 2 4 8] [--width 128]   # writes benchmarks/results/scale.{md,json}

Simulated CPU devices (the script sets ``--xla_force_host_platform_device_count`` before JAX starts when it
is run on its own), so it reports what the compiled SPMD programs do, never wall-clock: per-device FLOPs and
bytes accessed (XLA ``cost_analysis`` of the partitioned program), the blocks each device factorizes (the
LAPACK custom calls in its HLO and their batch sizes; XLA counts no FLOPs for them), and the bytes of
optimizer state one device holds. Workload: an MLP of 8 same-shape ``width x width`` tanh layers with biases,
batch 256, the batch split over a ``data`` axis and the parameters split over it too (FSDP / ZeRO), the
replicated baseline being the 1-device run. ``optax.contrib.muon`` runs under the same shardings. On a
machine with accelerators (never on simulated devices) it also times a step of each preset.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import curvplan as cp  # noqa: E402

LAYERS, ROWS = 8, 256
RESULTS = pathlib.Path(__file__).parent / "results"


def init_params(width: int, seed: int = 0, dtype=jnp.float32) -> dict:
    """``LAYERS`` tanh layers ``w{i}`` (``width x width``) with biases ``b{i}`` (the tests use it in float64)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(LAYERS):
        out[f"w{i}"] = jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), dtype)
        out[f"b{i}"] = jnp.zeros((width,), dtype)
    return out


def model_fn(p, x):
    for i in range(LAYERS):
        x = jnp.tanh(x @ p[f"w{i}"] + p[f"b{i}"])
    return x


def loss_fn(p, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((model_fn(p, x) - y) ** 2, axis=-1))


def make_batch(width: int, rows: int = ROWS, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    return x, np.tanh(x @ (rng.normal(size=(width, width)) / np.sqrt(width))).astype(np.float32)


def presets() -> dict:
    """The block-work families, each preconditioner refreshed every 5 steps."""
    by_model = {"model_fn": model_fn, "loss": "mse"}
    return {
        "shampoo": (cp.presets.shampoo(learning_rate=1e-3, root_every=5), {"loss_fn": loss_fn}),
        "soap": (cp.presets.soap(learning_rate=1e-3, precondition_frequency=5), {"loss_fn": loss_fn}),
        "kfac": (cp.presets.kfac(learning_rate=1e-2, loss="mse", inverse_every=5), by_model),
        "muon": (cp.presets.muon(learning_rate=1e-2), {"loss_fn": loss_fn}),
        "adaptive_schatten": (cp.presets.adaptive_schatten(learning_rate=1e-2, every=5), by_model),
    }


def mesh_of(n: int):
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def fsdp(params: dict, mesh) -> dict:
    """Every parameter split over ``data`` on its first axis (replicated where it does not divide)."""
    k = mesh.shape["data"]
    return {name: jax.device_put(v, NamedSharding(mesh, PartitionSpec("data") if v.shape[0] % k == 0
                                                   else PartitionSpec()))
            for name, v in params.items()}


_LAPACK = re.compile(r'custom_call_target="(?:lapack_|cusolver_|hipsolver_)?([a-z]*(?:syevd|heevd|potrf|geqrf|getrf|'
                     r'gesdd|trsm|syevj)[a-z_]*)"')
_RESULT = re.compile(r"=\s*\(?\s*[a-z]+[0-9]*\[([0-9,]*)\]")


_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_CALLEE = re.compile(r"(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def factorized_blocks(hlo: str) -> dict[str, int]:
    """Factorization target -> matrices factorized by one run of this program: the batch sizes of its LAPACK
    custom calls, times the trip count of every loop they sit in (a batched call may run as a loop of
    single calls), each branch of a conditional counted."""
    direct: dict[str, dict[str, int]] = {}
    children: dict[str, list[tuple[str, int]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            current = head.group(2)
            direct[current], children[current] = {}, []
            entry = current if head.group(1) else entry
            continue
        if current is None:
            continue
        m = _LAPACK.search(line)
        if m and " custom-call(" in line:
            dims = [int(d) for d in _RESULT.search(line).group(1).split(",") if d]
            n = math.prod(dims[:-2]) if len(dims) > 2 else 1
            direct[current][m.group(1)] = direct[current].get(m.group(1), 0) + n
        trip = _TRIP.search(line)
        for callee in _CALLEE.findall(line):
            children[current].append((callee, int(trip.group(1)) if trip and " while(" in line else 1))
        for group in _BRANCHES.findall(line):
            children[current] += [(c.strip().lstrip("%"), 1) for c in group.split(",")]

    def total(comp: str, seen: frozenset = frozenset()) -> dict[str, int]:
        out = dict(direct.get(comp, {}))
        for child, times in children.get(comp, []):
            if child in seen or child not in direct:
                continue
            for k, v in total(child, seen | {comp}).items():
                out[k] = out.get(k, 0) + times * v
        return out

    return total(entry) if entry is not None else {}


def _costs(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
            "factorized": factorized_blocks(compiled.as_text())}


def state_bytes(state) -> dict:
    """Bytes of ``state`` held by the first device: in total and in scalars (replicated by design)."""
    dev = jax.devices()[0]
    total = scalars = 0
    for leaf in jax.tree.leaves(state):
        if not hasattr(leaf, "addressable_shards"):
            continue
        held = sum(s.data.nbytes for s in leaf.addressable_shards if s.device == dev)
        total += held
        scalars += held if leaf.ndim == 0 else 0
    return {"state_bytes": int(total), "scalar_bytes": int(scalars)}


def measure(name: str, n: int, width: int) -> dict:
    """Per-device cost of every phase program of preset ``name`` on ``n`` devices, and its state."""
    modules, objective = presets()[name]
    mesh = mesh_of(n)
    opt = cp.Optimizer(modules, mesh=mesh, **objective)
    params = fsdp(init_params(width), mesh)
    host = make_batch(width)
    state = opt.init(params, batch=host)
    batch = opt.shard_batch(host)
    rng = jax.random.key(0)
    phases = [_costs(opt.compiled(i, params, state, batch, rng)) for i in range(len(opt.plan.phases))]
    return {"method": name, "devices": n, "phases": phases, "refresh": refresh_phase(opt.plan), **state_bytes(state)}


def refresh_phase(plan) -> int:
    """The phase that runs the most modules (every refresh at once): the program the issue's bound is on."""
    return max(range(len(plan.phases)), key=lambda i: len(plan.phases[i].modules))


def measure_optax_muon(n: int, width: int) -> dict:
    mesh = mesh_of(n)
    tx = optax.contrib.muon(learning_rate=1e-2)
    params = fsdp(init_params(width), mesh)
    like = {v.shape: v.sharding for v in params.values()}  # its moments split as their parameters are
    state = jax.tree.map(lambda x: jax.device_put(x, like.get(x.shape, NamedSharding(mesh, PartitionSpec()))),
                         jax.jit(tx.init)(params))
    batch = jax.device_put(make_batch(width), NamedSharding(mesh, PartitionSpec("data")))

    def step(p, s, b):
        g = jax.grad(loss_fn)(p, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step).lower(params, state, batch).compile()
    return {"method": "optax.contrib.muon", "devices": n, "phases": [_costs(compiled)], "refresh": 0,
            **state_bytes(state)}


def run(devices: list[int], width: int, log=print) -> list[dict]:
    if max(devices) > jax.device_count():
        raise SystemExit(f"asked for {max(devices)} devices, JAX has {jax.device_count()} (set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={max(devices)} before JAX starts)")
    rows = []
    for name in [*presets(), "optax.contrib.muon"]:
        for n in devices:
            log(f"[scale] {name} on {n} device{'s' * (n > 1)}")
            rows.append(measure_optax_muon(n, width) if name == "optax.contrib.muon" else measure(name, n, width))
    return rows


def markdown(rows: list[dict]) -> str:
    """One row per method and device count: the refresh program and the state, against 1 device."""
    base = {r["method"]: r for r in rows if r["devices"] == 1}
    out = ["| method | devices | refresh FLOPs / device | vs 1 device | bytes / device | vs 1 device "
           "| blocks factorized / device | state bytes / device | vs 1 device |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["method"], r)
        p, b = r["phases"][r["refresh"]], b["phases"][b["refresh"]]
        blocks = sum(p["factorized"].values())
        out.append(f"| {r['method']} | {r['devices']} | {p['flops']:.3g} | {p['flops'] / b['flops']:.3f} "
                   f"| {p['bytes']:.3g} | {p['bytes'] / b['bytes']:.3f} | {blocks} "
                   f"| {r['state_bytes']:,} | {r['state_bytes'] / base.get(r['method'], r)['state_bytes']:.3f} |")
    out.append("")
    out.append("Refresh program: the phase that runs every module. Blocks factorized: matrices handed to LAPACK's "
               "eigh / Cholesky / QR by one device's program (XLA counts no FLOPs for these calls). State: bytes "
               "of optimizer state on one device, replicated scalars included.")
    return "\n".join(out)


def wall_clock(name: str, n: int, width: int, steps: int = 20) -> float:
    """Median seconds per step of preset ``name`` on ``n`` accelerator devices (never on simulated CPUs)."""
    modules, objective = presets()[name]
    mesh = mesh_of(n)
    opt = cp.Optimizer(modules, mesh=mesh, **objective)
    params = fsdp(init_params(width), mesh)
    host = make_batch(width)
    state, batch = opt.init(params, batch=host), opt.shard_batch(host)
    for _ in range(len(opt.plan.phases) + 5):  # every phase compiled
        params, state, _ = opt.step(params, state, batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state, info = opt.step(params, state, batch)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS), help="folder for scale.md and scale.json")
    args = ap.parse_args(argv)
    rows = run(args.devices, args.width)
    md = markdown(rows)
    if jax.default_backend() != "cpu":  # real accelerators: wall-clock per step as well
        lines = ["", "| method | devices | ms / step |", "|---|---|---|"]
        for name in presets():
            for n in args.devices:
                lines.append(f"| {name} | {n} | {1e3 * wall_clock(name, n, args.width):.2f} |")
        md += "\n".join(lines)
    command = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"Scale-out suite, width {args.width}, batch {ROWS}, {jax.device_count()} {jax.default_backend()} "
          f"devices, jax {jax.__version__}: `{command.strip()}`\n\n{md}")
    print(md)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(md + "\n")
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
