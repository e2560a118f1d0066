"""Optimizers the benchmarks run, behind one interface: curvplan compositions (planned and unplanned), optax
baselines and peers (Somax v1 through ``python-somax``; kfac-jax through its own venv, see ``peers/``).

A `Runner` has ``init(params, key) -> state`` and ``step(params, state, batch, key) -> (params, state, loss)``
(host-callable; may dispatch to several compiled programs), ``period`` (steps over which its cost repeats) and
``programs(...)`` for XLA cost analysis.

>>> from benchmarks.workloads import get_workload
>>> r = make_runner("adamw", get_workload("w4"))
>>> r.label, r.period
('optax.adamw', 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import curvplan as cp
from benchmarks.workloads import Workload


@dataclasses.dataclass
class Runner:
    """One optimizer bound to one workload.

    Attributes:
        name: registry key; label: what tables print.
        init / step: see module docstring.
        period: the cost repeats every ``period`` steps (time and FLOPs are averaged over whole periods).
        programs: ``(params, state, batch, key) -> [(weight, jitted_fn, args)]``: the compiled programs one
            period runs and the fraction of steps each runs, for `cost_analysis`.
        n_programs: number of distinct compiled programs (`Plan.programs`); plan: the curvplan plan, if any.
    """

    name: str
    label: str
    init: Callable[[Any, jax.Array], Any]
    step: Callable[[Any, Any, Any, jax.Array], tuple]
    period: int = 1
    programs: Callable[..., list] | None = None
    n_programs: int = 1
    warmup_steps: int = 2
    """Steps after which every program has compiled (a plan's prefix plus one period)."""
    plan: Any = None
    extra: dict = dataclasses.field(default_factory=dict)
    scan: Callable[[Any, Any, Any, jax.Array], tuple] | None = None
    """``(params, state, stacked_batches, key) -> (params, state)``: many steps in one compiled program (no
    per-step host dispatch), where the optimizer allows it."""


def scanned(step: Callable) -> Callable:
    """A jitted ``lax.scan`` of a pure ``step(params, state, batch, key) -> (params, state, ...)``."""

    def run(params, state, batches, key):
        def body(carry, batch):
            return step(*carry, batch, key)[:2], None

        return jax.lax.scan(body, (params, state), batches)[0]

    return jax.jit(run)


# -- curvplan -----------------------------------------------------------------------------------------------
def curvplan_runner(name: str, modules: list, w: Workload, *, optimize: bool = True) -> Runner:
    plan = cp.compile_plan(modules, optimize=optimize, name=name)
    opt = cp.Optimizer(plan, **w.optimizer_kwargs())

    def step(params, state, batch, key):
        params, state, info = opt.step(params, state, batch, key)
        return params, state, info.loss

    def programs(params, state, batch, key):  # each phase's specialised program: XLA counts a cond's costlier branch
        steps = range(plan.prefix, plan.prefix + plan.period)
        out = []
        for i in range(len(plan.phases)):
            weight = sum(plan.phase_of(t) == i for t in steps) / plan.period
            if weight:
                out.append((weight, opt._phase_jit(i), (params, state, batch, key)))
        return out

    label = f"curvplan {name}" + ("" if optimize else " (unplanned)")
    return Runner(f"{name}{'' if optimize else ':unplanned'}", label, lambda p, k: opt.init(p, k), step,
                  period=plan.period, programs=programs, n_programs=len(plan.programs), plan=plan,
                  warmup_steps=plan.prefix + plan.period + 1,
                  extra={"optimizer": opt}, scan=lambda p, s, bs, k: opt.run(p, s, bs, k)[:2])


# -- optax --------------------------------------------------------------------------------------------------
def optax_runner(name: str, label: str, tx: optax.GradientTransformation, w: Workload, period: int = 1,
                 hessian: bool = False) -> Runner:
    """A jitted optax step. ``hessian=True``: the transformation wants ``obj_fn`` (optax.contrib.sophia)."""

    def _step(params, state, batch, key):
        loss, g = jax.value_and_grad(w.loss_fn)(params, batch)
        extra = {"obj_fn": lambda p: w.loss_fn(p, batch), "key": key} if hessian else {}
        updates, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    jstep = jax.jit(_step)
    return Runner(name, label, lambda p, k: tx.init(p), jstep, period=period,
                  programs=lambda *a: [(1.0, jstep, a)], scan=scanned(_step))


# -- Somax v1 -----------------------------------------------------------------------------------------------
def somax_runner(method: str, w: Workload, **kwargs) -> Runner:
    """A Somax v1 method (``python-somax``); batches are converted to its ``{"x", "y"}`` dicts."""
    import somax

    fn = getattr(somax, method)
    if method in ("sophia_h", "newton_cg", "adahessian", "newton_direct"):
        kwargs["loss_fn"] = lambda p, b: w.loss_fn(p, (b["x"], b["y"]))
    else:
        kwargs["predict_fn"] = w.model_fn
    m = fn(**kwargs)
    period = max(int(kwargs.get("eval_every_k", 1)), 1)

    def _step(params, state, batch, key):
        params, state, info = m.step(params, {"x": batch[0], "y": batch[1]}, state, key)
        return params, state, info

    jstep = jax.jit(_step)

    def step(params, state, batch, key):
        params, state, _ = jstep(params, state, batch, key)
        return params, state, jnp.nan  # Somax reports the loss only on request (it would cost a forward)

    return Runner(f"somax:{method}", f"somax {method}", lambda p, k: m.init(p), step, period=period,
                  programs=lambda *a: [(1.0, jstep, a)], scan=scanned(_step))


# -- the method table: a curvplan composition and, where one exists, the peer with the same settings ---------
@dataclasses.dataclass(frozen=True)
class Method:
    """A composition to benchmark. ``modules(w)`` builds the curvplan module list; ``peer(w)`` the peer's
    runner with the same settings (or None); ``shares``: whether planning has work to remove (cadences or
    quantities shared between modules), i.e. whether it belongs in the planning ablation; ``workload``: where
    the ablation and peer comparisons run it; ``defaults(w)``: what the time-to-target tables run where it
    differs from ``modules`` (the preset at its own defaults, where those are tuned for time to result and
    ``modules`` carries settings matched to a peer)."""

    modules: Callable[[Workload], list]
    peer: Callable[[Workload], Runner] | None = None
    defaults: Callable[[Workload], list] | None = None
    shares: bool = True
    workload: str = "w1"
    losses: tuple[str, ...] = ("ce", "mse")
    note: str = ""


# Settings shared by each curvplan composition and its peer. CG methods use tol=1e-12 so that both sides run
# exactly `maxiter` iterations (a per-step time comparison must not depend on where two trajectories stop).
CG = dict(lam=1.0, tol=1e-12, maxiter=10, warm_start=True, radius=None)
"""CG settings on both sides of the Somax comparison (Somax's CG has no trust radius, so curvplan's is off)."""
SOPHIA = dict(learning_rate=3e-3, hessian_every=10)
ADAHESSIAN = dict(learning_rate=3e-3, hessian_every=10)
KFAC = dict(learning_rate=0.1, damping=0.1, inverse_every=5, ema=0.95)
"""K-FAC settings shared by curvplan's preset and the kfac-jax peer script (benchmarks/peers/kfac_jax_w1.py)."""


def _somax_loss(w):
    return {"loss_fn": lambda p, b: w.loss_fn(p, (b["x"], b["y"]))}


def _somax(method, **kw):
    def peer(w):
        name = method.format(loss=w.loss_kind)
        return somax_runner(name, w, **kw)
    return peer


_SOMAX_CG = dict(lam0=CG["lam"], tol=CG["tol"], maxiter=CG["maxiter"], warm_start=CG["warm_start"],
                 learning_rate=1.0)
_SOMAX_SOPHIA = dict(learning_rate=SOPHIA["learning_rate"], eval_every_k=SOPHIA["hessian_every"])


def _shampoo_soap(w):
    """Shampoo (Adam-grafted) and SOAP on one gradient Gram and one eigendecomposition, averaged."""
    from curvplan.modules import Combine, GradGram, GramEigbasis, Shampoo, Soap, UpdateTail

    gram = GradGram(beta=0.95)
    return [gram, GramEigbasis(gram=gram.spec, method="eigh", every=10), Shampoo(gram=gram.spec, graft="adam"),
            Soap(gram=gram.spec, method="eigh"), Combine(sources=("shampoo", "soap")),
            UpdateTail(learning_rate=3e-3, source="mix")]


def _kfac_telemetry(w):
    """K-FAC plus Hutchinson trace/diagonal telemetry of the Hessian every 10 steps."""
    from curvplan.modules import Hessian

    return cp.presets.kfac(**KFAC) + [Hessian()] + [
        m.model_copy(update={"cadence": cp.Cadence(every=10)}) for m in cp.presets.hutchinson_estimates(1)]


METHODS: dict[str, Method] = {
    "gauss_newton_cg": Method(lambda w: cp.presets.gauss_newton_cg(loss=w.loss_kind, **CG), _somax("sgn_{loss}", **_SOMAX_CG),
                              shares=False, note="one linearization per step; nothing to share",
                              defaults=lambda w: cp.presets.gauss_newton_cg(loss=w.loss_kind)),
    # Newton-CG with λ = 10 and lr 0.5 so that neither side diverges on W1 (a NaN ends Somax's CG at once)
    "newton_cg": Method(lambda w: cp.presets.newton_cg(**{**CG, "lam": 10.0}, learning_rate=0.5),
                        _somax("newton_cg", **{**_SOMAX_CG, "lam0": 10.0, "learning_rate": 0.5}), shares=False),
    "egn": Method(lambda w: cp.presets.egn(loss=w.loss_kind, lam=1.0), _somax("egn_{loss}", lam0=1.0, learning_rate=1.0),
                  shares=False, workload="w4", note="row space: B x outputs rows"),
    "sophia_h": Method(lambda w: cp.presets.sophia_h(**SOPHIA), _somax("sophia_h", **_SOMAX_SOPHIA)),
    "sophia_g": Method(lambda w: cp.presets.sophia_g(**SOPHIA), _somax("sophia_g", **_SOMAX_SOPHIA), losses=("ce",)),
    "adahessian": Method(lambda w: cp.presets.adahessian(**ADAHESSIAN),
                         _somax("adahessian", learning_rate=ADAHESSIAN["learning_rate"],
                                eval_every_k=ADAHESSIAN["hessian_every"]),
                         defaults=lambda w: cp.presets.adahessian()),
    "levenberg_marquardt": Method(
        lambda w: cp.presets.levenberg_marquardt(loss=w.loss_kind, rho_every=5, lam0=CG["lam"], tol=CG["tol"],
                                                 maxiter=CG["maxiter"]),
        _somax("sgn_{loss}", **{**_SOMAX_CG, "lam_policy": "trust_region", "lam_kwargs": {"every_k": 5},
                                "record_rho_every_k": 5}),
        workload="w4", note="rho every 5 steps"),
    "hessian_free": Method(lambda w: cp.presets.hessian_free(loss=w.loss_kind, maxiter=10), workload="w4"),
    "kfac": Method(lambda w: cp.presets.kfac(**KFAC), note="peer: kfac-jax, own venv (`make bench-peers`)"),
    "kfac_adaptive": Method(lambda w: cp.presets.kfac(adaptive=True, damping=KFAC["damping"], loss=w.loss_kind),
                            note="alpha, beta from the quadratic model; damping adapted every 5"),
    "kfac+hutchinson": Method(_kfac_telemetry, note="K-FAC + Hessian trace/diagonal telemetry every 10"),
    "shampoo": Method(lambda w: cp.presets.shampoo(learning_rate=3e-3, root_every=10)),
    "soap": Method(lambda w: cp.presets.soap(learning_rate=3e-3, precondition_frequency=10)),
    "shampoo+soap": Method(_shampoo_soap, note="one Gram, one eigendecomposition every 10"),
    "scao": Method(lambda w: cp.presets.scao_modules(learning_rate=3e-3, warmup_steps=20, precond_freq=10,
                                                     weight_decay=0.0)),
    "muon": Method(lambda w: cp.presets.muon(0.02), lambda w: optax_runner("optax:muon", "optax.contrib.muon",
                   optax.contrib.muon(0.02), w), shares=False, workload="w3", note="same defaults on both sides"),
    "adaptive_schatten": Method(lambda w: cp.presets.adaptive_schatten(0.02), workload="w1",
                                note="criterion every 100 steps"),
    "muadam": Method(lambda w: cp.presets.muadam(1e-3), shares=False, workload="w3",
                     note="Adam-preconditioned polar factor on matrices"),
    "hutchinson_every_10": Method(lambda w: cp.presets.adahessian_like(hessian_every=10, learning_rate=0.05),
                                  note="Hessian diagonal refreshed every 10 steps"),
}


def adamw(w: Workload, learning_rate: float | None = None) -> Runner:
    lr = learning_rate or ADAMW_LR.get(w.name.split("-")[0], 1e-3)
    return optax_runner("adamw", "optax.adamw", optax.adamw(lr, weight_decay=1e-4), w)


ADAMW_LR = {"w1": 3e-3, "w2": 3e-3, "w3": 3e-3, "w4": 3e-3, "w5": 1e-2}
"""AdamW learning rates (best of {1e-3, 3e-3, 1e-2} on each workload's time-to-target run, see README)."""


def make_runner(name: str, w: Workload) -> Runner:
    """``adamw``, ``cp:<method>``, ``cp:<method>:unplanned``, ``cp:<method>:defaults``, ``peer:<method>``
    (see `METHODS`)."""
    if name == "adamw":
        return adamw(w)
    kind, _, rest = name.partition(":")
    method, _, variant = rest.partition(":")
    if kind in ("cp", "peer") and method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if kind == "cp":
        make = METHODS[method].defaults if variant == "defaults" else None
        return curvplan_runner(method, (make or METHODS[method].modules)(w), w, optimize=variant != "unplanned")
    if kind == "peer":
        if METHODS[method].peer is None:
            raise KeyError(f"method {method!r} has no peer")
        return METHODS[method].peer(w)
    raise KeyError(f"unknown optimizer {name!r}: use adamw, cp:<method>[:unplanned] or peer:<method>")
