"""Every registered module kind, lowered and stepped with its outputs tagged and its consumers `take`-ing them.

The model is a small two-layer MLP with a cross-entropy loss. Each kind has a composition it runs in (a preset
where one has it, a short list otherwise). The sweep tags the module under test (``tag="t"``), makes every
module that reads one of its outputs take the tagged one, and checks that the tagged plan lowers, steps twice
and gives the same updates as the untagged plan: a tag changes names, never numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvplan as cp
from curvplan.ir import MODULE_KINDS
from curvplan.modules import presets as P

M = cp.modules

SHAPES = {"w1": (8, 6), "b1": (6,), "w2": (6, 3), "b2": (3,)}


def model_fn(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _problem():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    params = {k: 0.3 * jax.random.normal(kk, s) for (k, s), kk in zip(SHAPES.items(), keys)}
    x = jax.random.normal(keys[4], (16, 8))
    y = jax.random.randint(keys[5], (16,), 0, 3)
    return params, (x, y)


def _direct(curv):
    return [curv, M.ConstantDamping(lam=1.0), M.CG(maxiter=5), M.UpdateTail(learning_rate=0.1)]


# A composition for every kind that no preset below contains.
EXTRA = {
    "empirical_fisher": lambda: _direct(M.EmpiricalFisher()),
    "sampled_fisher": lambda: _direct(M.SampledFisher()),
    "gain_ratio": lambda: [M.GGN(), M.ConstantDamping(lam=1.0), M.CG(maxiter=5), M.GainRatio(),
                           M.UpdateTail(learning_rate=0.1)],
    "identity_solve": lambda: [M.IdentitySolve(), M.UpdateTail(learning_rate=0.1)],
    "diagonal_solve": lambda: [M.Hessian(), M.HutchinsonDiag(), M.DiagEMA(), M.ConstantDamping(lam=1.0),
                               M.DiagonalSolve(), M.UpdateTail(learning_rate=0.1)],
    "gnb_diag": lambda: P.sophia_g(),
    "lanczos": lambda: _direct(M.Hessian()) + [M.Lanczos(iters=4)],
    "combine": lambda: [M.Hessian(), M.ConstantDamping(lam=1.0), M.CG(maxiter=5), M.HutchinsonDiag(), M.DiagEMA(),
                        M.DiagonalDirection(), M.Combine(sources=("newton", "diag"), target="mix"),
                        M.UpdateTail(learning_rate=0.1, source="mix")],
    "lmo_direction": lambda: P.scion(),
    "row_space": lambda: P.egn(loss="ce"),
    "trust_region_damping": lambda: P.levenberg_marquardt(loss="ce"),
    "quadratic_step": lambda: [M.GGN(), M.ConstantDamping(lam=1.0), M.IdentitySolve(), M.QuadraticStep()],
    "lookahead": lambda: [M.IdentitySolve(), M.Lookahead(beta=0.5), M.UpdateTail(learning_rate=0.1, source="lookahead")],
}

PRESETS = [P.newton_cg, P.gauss_newton_cg, P.adahessian, P.adahessian_like, P.sophia_h, P.levenberg_marquardt,
           P.hessian_free, P.hutchinson_estimates, P.kfac, P.shampoo, P.soap, P.scao_modules, P.muon,
           P.adaptive_schatten, P.muadam, P.egn, P.newton_direct, P.ggn_direct]


def _composition(kind: str):
    if kind in EXTRA:
        return EXTRA[kind] and EXTRA[kind]()
    for make in PRESETS:
        mods = make()
        if any(m.kind == kind for m in mods):
            if kind == "hutchinson_trace" or make is P.hutchinson_estimates:
                mods = _direct(M.Hessian()) + mods
            return mods
    return None


KINDS = sorted(k for k, cls in MODULE_KINDS.items()  # the library's kinds, not those tests define
               if issubclass(cls, cp.modules.Module) and cls.__module__.startswith("curvplan."))


def _tagged(mods, kind: str):
    """``mods`` with the first module of ``kind`` tagged ``t`` and its readers taking the tagged outputs."""
    target = next(m for m in mods if m.kind == kind)
    outs = set(target.outputs())
    out = []
    for m in mods:  # `take` selects by name: only modules that read one of the target's own outputs take
        reads = {u.quantity.name.lstrip("%") for u in m.uses() if u.quantity in outs}
        upd = {"take": tuple(sorted(set(m.take) | {(n, "t") for n in reads}))} if reads else {}
        if m is target:
            upd["tag"] = "t"
        out.append(type(m)(**(m.to_dict() | upd)) if upd else m)
    return out


def _run(mods, params, batch, steps=2):
    opt = cp.Optimizer(mods, model_fn=model_fn, loss="ce")
    state = opt.init(params, jax.random.PRNGKey(1), batch)
    ups = []
    for t in range(steps):
        new, state, info = opt.step(params, state, batch, jax.random.PRNGKey(2 + t))
        ups.append(jax.tree.map(lambda a, b: np.asarray(a - b), new, params))
        params = new
    return ups, info


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_runs_tagged_with_the_same_numbers(kind):
    mods = _composition(kind)
    if mods is None:
        assert kind in EXTRA, f"module kind {kind!r} has no composition in the sweep: add one to EXTRA"
        return
    if kind in ("update_tail", "quadratic_step"):
        tagged = mods  # %update is the plan's output: it is never tagged
    else:
        tagged = _tagged(mods, kind)
    params, batch = _problem()
    plain, _ = _run(mods, params, batch)
    got, info = _run(tagged, params, batch)
    assert not bool(info.skipped)
    for a, b in zip(plain, got):
        for k in SHAPES:
            assert np.all(np.isfinite(b[k]))
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=f"{kind}: leaf {k}")


def test_the_sweep_covers_every_registered_kind():
    missing = [k for k in KINDS if _composition(k) is None and k not in EXTRA]
    assert not missing, f"kinds without a sweep composition: {missing}"
