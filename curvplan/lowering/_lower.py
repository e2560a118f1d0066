"""Plan -> JAX programs over one shared state structure and one `StepInfo` schema.

`lower_plan(plan, objective)` returns a `LoweredPlan` with

- ``init(params, rng=None) -> PlanState``;
- ``program_fns[k](params, state, batch, rng, given) -> (updates, state, info)``, one per group of
  `Plan.programs` (phases with one provider pass; their differing module work under ``lax.cond``);
- ``phase_fns[i]``, the same for phase ``i`` alone: its specialised program (cost analysis reads these);
- ``switch(params, state, batch, rng, given)``: ``lax.switch`` over the programs keyed by ``state.step``.

An unplanned plan (``optimize=False``) has one phase whose module ops carry guards; each guarded module runs
under ``lax.cond`` on its cadence, as hand-wired code would.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvplan.ir import quantities as qs
from curvplan.ir._errors import LoweringError
from curvplan.ir._module import state_type
from curvplan.ir._quantity import Quantity
from curvplan.ir._schedule import Op, Phase
from curvplan.lowering._layers import discover_layers
from curvplan.lowering._objective import PROVIDER_IMPLS, Objective
from curvplan.modules._base import Context, Inputs, Module, tree_all_finite
from curvplan.modules._blocks import LOCAL, BlockMap
from curvplan.planner._plan import Plan

_INFO_DEFAULTS = {"float": jnp.nan, "int": -1, "bool": False}
_INFO_DTYPES = {"float": jnp.float32, "int": jnp.int32, "bool": jnp.bool_}
BASE_INFO = (("loss", "float"), ("update_norm", "float"), ("skipped", "bool"), ("skipped_steps", "int"),
             ("phase", "int"))


class PlanState(NamedTuple):
    """Optimizer state shared by every phase.

    Attributes:
        step: int32 step counter (selects the phase).
        modules: module name -> that module's state.
        slots: carried quantity name -> its last computed value.
        skipped: number of steps whose update was not finite and was not applied.
    """

    step: jax.Array
    modules: dict[str, Any]
    slots: dict[str, Any]
    skipped: jax.Array


@jax.tree_util.register_pytree_node_class
class StepInfo:
    """Telemetry of one step: a fixed set of scalar fields per plan (absent metrics: NaN / -1 / False).

    Fields always present: ``loss``, ``update_norm``, ``skipped`` (this step's update was not applied),
    ``skipped_steps`` (running count), ``phase``; plus the ``info_fields`` of the plan's modules, prefixed by
    nothing when unique (``cg_iters``) and by ``module.`` when two modules report the same key.
    """

    def __init__(self, fields: dict[str, Any]):
        self._fields = dict(fields)

    def tree_flatten(self):
        keys = tuple(sorted(self._fields))
        return tuple(self._fields[k] for k in keys), keys

    @classmethod
    def tree_unflatten(cls, keys, values):
        return cls(dict(zip(keys, values)))

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_fields"][key]
        except KeyError:
            raise AttributeError(f"StepInfo has no field {key!r}; fields: {sorted(self._fields)}") from None

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def keys(self):
        return sorted(self._fields)

    def as_dict(self) -> dict[str, Any]:
        """The fields as arrays, sorted by name."""
        return {k: self._fields[k] for k in self.keys()}

    def scalars(self) -> dict[str, Any]:
        """The fields as Python numbers, for logging tools (one host transfer for all of them).

        A single step gives ``{name: float | int | bool}``; the stacked info of `Optimizer.run` gives lists
        with one entry per step.

        >>> import jax.numpy as jnp
        >>> StepInfo({"loss": jnp.float32(0.5), "skipped": jnp.bool_(False)}).scalars()
        {'loss': 0.5, 'skipped': False}
        """
        values = jax.device_get(self.as_dict())
        return {k: np.asarray(v).tolist() for k, v in values.items()}

    def __repr__(self) -> str:
        def fmt(v):
            try:
                v = np.asarray(v)
                return f"{v.item():.4g}" if v.dtype.kind == "f" and v.ndim == 0 else str(v.tolist())
            except Exception:  # tracers
                return "?"
        return "StepInfo(" + ", ".join(f"{k}={fmt(v)}" for k, v in self.as_dict().items()) + ")"


def state_dtype(dtype) -> Any:
    """The dtype curvplan stores a floating state entry in: the entry's own, widened to at least float32.

    One rule for every module: statistics, moments, factors, bases and carried directions of bfloat16 / float16
    parameters are kept in float32 (float64 stays float64 under x64); integer counters and keys are untouched.
    Lowering applies it to what ``init`` returns and casts each new state back to it, so a module cannot drift
    into the parameters' precision. Updates leave in the parameters' dtype (``optax.apply_updates`` casts).
    """
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def _widen(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(state_dtype(x.dtype)) if hasattr(x, "dtype") else x, tree)


def _like(new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: n.astype(o.dtype) if hasattr(o, "dtype") and hasattr(n, "astype") else n,
                        new, old)


def _step_is_finite(updates, env) -> jax.Array:
    """A step is applied when its update, its gradient and its loss are finite. The gradient counts on its own:
    a method that bounds its update (Sophia's clip) would otherwise take an Inf gradient into its moments."""
    checks = [tree_all_finite(updates)]
    for kind in (qs.grad(), qs.loss()):
        if kind in env:
            checks.append(tree_all_finite(env[kind]))
    return jnp.all(jnp.stack(checks))


def _floating(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _kept(finite: jax.Array, new: Any, old: Any, initial: Callable[[], Any]) -> Any:
    """The state after a step: ``new`` when the step is applied. On a skipped step the floating state
    (statistics, moments, bases) is the previous one, while counters move on: the step count, a schedule's
    count and failure counts advance, so a fault tied to one step (a schedule that returns Inf once) does not
    repeat forever, and the telemetry of the skipped step matches the state. A previous entry that is itself
    not finite (poisoned before this step: a restored checkpoint, a fault in another program) is started
    afresh from ``initial()``, so the next step can succeed; only a skipped step computes it."""

    def skipped():
        fresh = initial()

        def one(n, o, f):
            if not jnp.issubdtype(n.dtype, jnp.inexact):
                return n
            return jnp.where(jnp.all(jnp.isfinite(o)), o, f)

        return jax.tree.map(one, new, old, fresh)

    return jax.lax.cond(finite, lambda: new, skipped)


def _module_rng(rng: jax.Array | None, label: str, step: jax.Array) -> jax.Array | None:
    if rng is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(rng, step), zlib.crc32(label.encode()) & 0x7FFFFFFF)


class LoweredPlan:
    """JAX programs for a plan and an objective. Built by `lower_plan`."""

    def __init__(self, plan: Plan, objective: Objective, mesh: Any = None):
        self.plan = plan
        self.objective = objective
        self.mesh = mesh
        self._blocks = self._block_maps(plan, mesh)
        self.modules: dict[str, Module] = {}
        for m in plan.modules:
            if not isinstance(m, Module):
                raise LoweringError(
                    f"module `{m.label}` ({type(m).__name__}) is a declaration only and cannot run",
                    where=f"module `{m.label}`",
                    fix="use modules from `curvplan.modules` (subclasses of `curvplan.modules.Module`)",
                )
            self.modules[m.label] = m
        self.update_q = next((x for x in self._all_outputs() if x.kind == "update" and x.scope == "all"), None)
        if self.update_q is None:
            raise LoweringError(
                "no module in the plan produces %update",
                where=f"plan {plan.name!r}",
                fix="end the composition with an update transform, e.g. `cp.modules.UpdateTail(learning_rate=1.0)`",
            )
        self._check_objective()
        self.info_schema = self._info_schema()
        window = plan.prefix + plan.period
        self.phase_table = np.asarray(plan.table, dtype=np.int32)
        self.run_table = {
            lbl: np.asarray([(mask >> t) & 1 for t in range(window)], dtype=bool) for lbl, mask in plan.run.items()
        }
        self.phase_fns: tuple[Callable, ...] = tuple(self._program_fn((ph.index,)) for ph in plan.phases)
        self.program_fns: tuple[Callable, ...] = tuple(self._program_fn(g) for g in plan.programs)
        self.guard_override: dict[str, bool] | None = None
        """For cost analysis of the unplanned baseline: module -> take (True) / skip (False) its guard
        statically instead of ``lax.cond`` (XLA's cost analysis counts a cond's costliest branch)."""

    @functools.cached_property
    def model_need(self) -> tuple[Phase, str, Quantity] | None:
        """(phase, module, quantity) of the first module that reads what only the model provides (a provider
        op's output), or None when every phase uses only given quantities (a gradient-only plan)."""
        for ph in self.plan.phases:
            provided = {x for op in ph.ops if op.role == "provider" for x in op.outputs}
            if not provided:
                continue
            reader = next(((op.name, r.node) for op in ph.ops if op.role == "module" for r in op.reads
                           if r.node in provided), None)
            who, what = reader if reader else (ph.providers[0], sorted(provided)[0])
            return ph, who, what
        return None

    def _check_objective(self) -> None:
        """A phase that evaluates the model (any provider op) needs one: refuse at construction, naming the
        first module that reads a provider's output, instead of failing inside a traced step."""
        if self.objective.given:
            return
        needs = self.model_need
        if needs is not None:
            ph, who, what = needs
            given = ", ".join(x.name for x in self.plan.given) or "nothing"
            raise LoweringError(
                f"module `{who}` needs {what.name}, which only the model can provide (phase {ph.index} runs "
                f"{', '.join(ph.providers)}), but no loss or model was given (given: {given})",
                where=f"module `{who}`, quantity {what.name}",
                fix="pass `loss_fn=f` with f(params, batch) -> scalar (or `model_fn=g, loss='mse'|'ce'`), "
                    "and `batch=` to each update"
                    + ("; a plan that needs only the gradient runs without one under `cp.as_optax(plan)`"
                       if what.kind == "grad" else ""),
            )

    def _all_outputs(self):
        for m in self.plan.modules:
            yield from m.outputs()

    def _info_schema(self) -> dict[str, tuple[str, str, str]]:
        """Flat key -> (module, key in module, dtype)."""
        counts: dict[str, int] = {}
        for m in self.plan.modules:
            for k, _ in m.info_fields:
                counts[k] = counts.get(k, 0) + 1
        schema = {}
        for m in self.plan.modules:
            for k, dt in m.info_fields:
                flat = k if counts[k] == 1 else f"{m.label}.{k}"
                schema[flat] = (m.label, k, dt)
        return schema

    # -- state ------------------------------------------------------------------------------------------
    def init(self, params: Any, rng: jax.Array | None = None, batch: Any = None) -> PlanState:
        """The state for ``params``. Given an example ``batch`` (shapes are what matter), modules that lay out
        per-layer state (K-FAC) read the model's layers off the traced loss instead of assuming a weight layout."""
        mods, slots = self._initial(params, rng, batch)
        return PlanState(jnp.zeros((), jnp.int32), mods, slots, jnp.zeros((), jnp.int32))

    def _output_name(self, op: Op, quantity: Quantity) -> str:
        m = self.modules[op.name]
        return dict(zip(m.outputs(), m.output_names()))[quantity]

    def _initial_like(self, old: Any, params: Any, rng: jax.Array | None, batch: Any) -> Any:
        """The initial (modules, slots) laid out as ``old`` is: built without the batch or with it (K-FAC's
        layout follows whether ``init`` saw one); ``old`` itself when neither matches."""
        def layout(tree):
            return jax.tree.structure(tree), [jnp.shape(x) for x in jax.tree.leaves(tree)]

        for b in (None, batch) if batch is not None else (None,):
            fresh = self._initial(params, rng, b)
            if layout(fresh) == layout(old):
                return _like(fresh, old)
        return old

    def _initial(self, params: Any, rng: jax.Array | None, batch: Any) -> tuple[dict, dict]:
        """Every module's initial state and every slot's initial value (by slot name)."""
        step = jnp.zeros((), jnp.int32)
        mods, slots = {}, {}
        layers = None
        if batch is not None and self.objective.given:  # traced once, on the first module that asks
            layers = functools.cache(lambda: discover_layers(self.objective.loss, params, batch))

        for lbl, m in self.modules.items():
            ctx = dataclasses.replace(self._ctx(lbl, step, rng, params, None), layers=layers)
            mods[lbl] = _checked_state(m, m.init(params, ctx))
        writers = {}
        for ph in self.plan.phases:
            for op in ph.ops:
                for w in op.writes:
                    writers.setdefault(w, op)
        for qv in self.plan.slots:
            op = writers.get(qv)
            if op is None or op.role != "module":
                raise LoweringError(f"carried {qv.name} has no module that writes it", where=f"slot {qv.name}")
            m = self.modules[op.name]
            ctx = dataclasses.replace(self._ctx(op.name, step, rng, params, None), layers=layers)
            slots[self.plan.names[qv]] = m.init_carried(self._output_name(op, qv), params, ctx)
        return _widen(mods), _widen(slots)

    def _ctx(self, label, step, rng, params, batch) -> Context:
        return Context(step, _module_rng(rng, label, step), params, batch, self.objective, label,
                       blocks=self._blocks.get(label, LOCAL))

    @staticmethod
    def _block_maps(plan: Plan, mesh: Any) -> dict[str, BlockMap]:
        """Module name -> where its block work runs, from the plan's placement on ``mesh``."""
        pl = plan.placement
        if mesh is None:
            if pl is not None and pl.devices > 1:
                raise LoweringError(
                    f"plan {plan.name!r} is placed on a mesh of {pl.devices} devices, but no mesh was given",
                    where="lower_plan(plan, objective, mesh=None)",
                    fix="pass the mesh the plan was compiled for (`cp.Optimizer(modules, ..., mesh=mesh)`)",
                )
            return {}
        if pl is None or dict(pl.mesh) != dict(mesh.shape):
            have = None if pl is None else dict(pl.mesh)
            raise LoweringError(
                f"plan {plan.name!r} was placed on mesh {have}, not on the given mesh {dict(mesh.shape)}",
                where="lower_plan(plan, objective, mesh)",
                fix="compile the plan with `compile_plan(modules, mesh=mesh)`, or pass the module list to "
                    "`cp.Optimizer(..., mesh=mesh)`",
            )
        return {label: BlockMap(mesh, pl.block_axes) for label in pl.blockwise}

    # -- one program ------------------------------------------------------------------------------------
    def _program_fn(self, group: tuple[int, ...]) -> Callable:
        """One program running the phases in ``group`` (one provider pass; see `Plan.programs`).

        Each module is traced once. A module that runs in every phase of the group runs unconditionally; one
        that runs in some of them runs under ``lax.cond`` on the phase (skipped: its state and carried
        outputs stay). A read that is fresh in some phases and carried in others takes the carried value
        where the phase reads it carried. A group of one phase is exactly that phase's specialised program.
        """
        plan = self.plan
        phases = [plan.phases[i] for i in group]
        merged = _merge_ops(phases)
        if merged is None:  # the phases order their work differently: one specialised program each
            fns = [self._program_fn((i,)) for i in group]
            position = np.zeros(len(plan.phases), np.int32)
            position[list(group)] = np.arange(len(group))

            def switched(params, state, batch, rng, given):
                branches = [lambda a, s, b, r, g, f=f: f(a, s, b, r, g) for f in fns]
                k = jnp.asarray(position)[self.phase_index(state.step)]
                return jax.lax.switch(k, branches, params, state, batch, rng, given)

            return switched
        providers = [op for op in phases[0].ops if op.role == "provider"]

        def run_program(params, state: PlanState, batch, rng, given: dict[Quantity, Any]):
            index = jnp.asarray(group[0], jnp.int32) if len(group) == 1 else self.phase_index(state.step)

            def in_phases(ps):  # None: every phase of the group
                return None if len(ps) == len(group) else jnp.any(index == jnp.asarray(sorted(ps), jnp.int32))

            env: dict[Quantity, Any] = dict(given)
            mods, slots = dict(state.modules), dict(state.slots)
            infos: dict[str, dict[str, Any]] = {}
            written: list[tuple[Any, Any]] = []  # (state written, whether its module ran)
            for op in providers:
                env.update(self._run_provider(op, params, batch, rng))
            for mop in merged:
                op, m, when = mop.op, self.modules[mop.op.name], in_phases(mop.phases)
                ctx = self._ctx(op.name, state.step, rng, params, batch)
                inputs = {}
                for r, (how, fresh_in) in zip(op.reads, mop.reads):
                    if r.node.kind == "rng":
                        inputs[r.quantity] = ctx.rng
                    elif how == "input":
                        inputs[r.quantity] = {"params": params, "batch": batch}[r.node.kind]
                    elif how == "slot":  # the value from before this step, whatever ran earlier in it
                        inputs[r.quantity] = state.slots[plan.names[r.node]]
                    elif how == "fresh":
                        inputs[r.quantity] = env[r.node]
                    else:  # fresh in some phases, carried in others: the carried value there
                        inputs[r.quantity] = _fresh_or_carried(env[r.node], state.slots[plan.names[r.node]],
                                                               in_phases(fresh_in), how == "select")
                # reads are in declaration order (take applied by the planner): the module's names for them
                inputs = Inputs(dict(zip(m.input_names(), (inputs[r.quantity] for r in op.reads))), op.name)
                outs, new_state, info = self._run_module(m, op, inputs, mods[op.name], ctx, state.slots,
                                                         state.step, when)
                mods[op.name] = _like(new_state, mods[op.name])
                infos[op.name] = info
                for qv in op.outputs:
                    env[qv] = outs[qv]
                for w in op.writes:
                    slots[plan.names[w]] = _like(outs[w], state.slots[plan.names[w]])
                # a step whose new state is not finite is not applied
                checked = [slots[plan.names[w]] for w in op.writes
                           if self._output_name(op, w) not in m.nonfinite_outputs]
                written.append(([mods[op.name], checked], when))
            updates = env[self.update_q]
            finite = _step_is_finite(updates, env)
            for tree, when in written:
                ok = tree_all_finite(_floating(tree))
                finite = finite & (ok if when is None else ok | ~when)
            mods, slots = _kept(finite, (mods, slots), (state.modules, state.slots),
                                lambda: self._initial_like((state.modules, state.slots), params, rng, batch))
            new = PlanState(state.step + 1, mods, slots, state.skipped + (~finite).astype(state.skipped.dtype))
            updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
            info = self._info(env, infos, updates, finite, new.skipped, index)
            return updates, new, info

        run_program.__name__ = "phase_" + "_".join(map(str, group))
        return run_program

    def _run_provider(self, op: Op, params, batch, rng) -> dict[Quantity, Any]:
        impl = PROVIDER_IMPLS.get(op.op)
        if impl is None:
            raise LoweringError(
                f"provider rule {op.op!r} has no JAX implementation",
                where=f"provider {op.op}",
                fix="register one with `curvplan.lowering.register_provider_impl`",
            )
        vals = impl(self.objective, params, batch, rng)
        out = {}
        for qv in op.outputs:
            base = qv.replace(attrs=tuple((k, v) for k, v in qv.attrs if k != "instance"))
            if base not in vals:
                raise LoweringError(
                    f"provider {op.op} did not produce {base.name} for this objective",
                    where=f"provider {op.op}, quantity {base.name}",
                    fix="check the objective's loss kind matches the modules (e.g. GGN(loss='ce') needs loss='ce')",
                )
            out[qv] = vals[base]
        return out

    def _run_module(self, m: Module, op: Op, inputs, mstate, ctx: Context, slots, step, when=None):
        """The module's outputs, new state and telemetry; under ``lax.cond`` on ``when`` (its phases, in a
        merged program) and on its own cadence (``op.guard``, the unplanned baseline)."""
        def run(inputs, mstate):
            outs, new_state, info = _unpack(m, m.apply(inputs, mstate, ctx))
            by_name = dict(zip(m.outputs(), m.output_names()))
            return {x: outs[by_name[x]] for x in op.outputs}, new_state, self._module_info(m, info)

        forced = self.guard_override.get(op.name) if self.guard_override and op.guard is not None else None
        if (op.guard is None or forced is True) and when is None:
            return run(inputs, mstate)
        try:
            shapes = jax.eval_shape(lambda: run(inputs, mstate))
        except TypeError:
            # outputs that are not arrays (operators) cannot leave a lax.cond: they are trace-time closures
            # whose cost is paid by their consumers, which are guarded themselves.
            return run(inputs, mstate)
        active = when
        if op.guard is not None and forced is None:
            cadence = jnp.asarray(self.run_table[op.name])[self._reduce(step)]
            active = cadence if active is None else active & cadence

        def skip():
            outs = {}
            for x in op.outputs:
                if x in op.writes:  # in the output's dtype (the state's may be wider)
                    outs[x] = jax.tree.map(lambda s, sh: s.astype(sh.dtype), slots[self.plan.names[x]],
                                           shapes[0][x])
                else:
                    outs[x] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0][x])
            info = {k: jnp.asarray(_INFO_DEFAULTS[dt], _INFO_DTYPES[dt]) for k, dt in m.info_fields}
            return outs, mstate, info

        if forced is False:
            return skip()
        if active is None:
            return run(inputs, mstate)
        return jax.lax.cond(active, lambda: run(inputs, mstate), skip)

    def _module_info(self, m: Module, reported: dict[str, Any]) -> dict[str, Any]:
        declared = dict(m.info_fields)
        extra = set(reported) - set(declared)
        if extra:
            raise LoweringError(
                f"module `{m.label}` reported undeclared telemetry {sorted(extra)}",
                where=f"module `{m.label}`",
                fix=f"add them to `{type(m).__name__}.info_fields`",
            )
        return {k: jnp.asarray(reported.get(k, _INFO_DEFAULTS[dt]), _INFO_DTYPES[dt]) for k, dt in declared.items()}

    def _info(self, env, infos, updates, finite, skipped, phase_index) -> StepInfo:
        loss = env.get(qs.loss())
        if loss is None:  # unplanned baseline: every module has its own (equal) copy
            loss = next((v for k, v in sorted(env.items(), key=lambda kv: kv[0].sort_key) if k.kind == "loss"), None)
        fields = {
            "loss": jnp.asarray(jnp.nan if loss is None else loss, jnp.float32),
            "update_norm": optax.tree.norm(updates).astype(jnp.float32),
            "skipped": ~finite,
            "skipped_steps": skipped,
            "phase": jnp.asarray(phase_index, jnp.int32),
        }
        for flat, (lbl, key, dt) in self.info_schema.items():
            got = infos.get(lbl, {}).get(key)
            fields[flat] = jnp.asarray(_INFO_DEFAULTS[dt] if got is None else got, _INFO_DTYPES[dt])
        return StepInfo(fields)

    def empty_info(self) -> StepInfo:
        """A `StepInfo` with every field of this plan's schema at its "absent" value."""
        fields = {k: jnp.asarray(_INFO_DEFAULTS[dt], _INFO_DTYPES[dt]) for k, dt in BASE_INFO}
        for flat, (_, _, dt) in self.info_schema.items():
            fields[flat] = jnp.asarray(_INFO_DEFAULTS[dt], _INFO_DTYPES[dt])
        return StepInfo(fields)

    # -- dispatch ---------------------------------------------------------------------------------------
    def _reduce(self, step: jax.Array) -> jax.Array:
        p = self.plan
        return jnp.where(step < p.prefix + p.period, step, p.prefix + (step - p.prefix) % p.period)

    def phase_index(self, step: jax.Array) -> jax.Array:
        """The phase of a (traced) step, from the phase table as a constant array."""
        return jnp.asarray(self.phase_table)[self._reduce(step)]

    def switch(self, params, state: PlanState, batch, rng=None, given=None):
        """One step with the phase chosen inside the program (``lax.switch`` on ``state.step``)."""
        given = given or {}
        if len(self.program_fns) == 1:
            return self.program_fns[0](params, state, batch, rng, given)
        branches = [lambda a, s, b, r, g, f=f: f(a, s, b, r, g) for f in self.program_fns]
        program = np.zeros(len(self.plan.phases), np.int32)
        for k, g in enumerate(self.plan.programs):
            program[list(g)] = k
        return jax.lax.switch(jnp.asarray(program)[self.phase_index(state.step)], branches, params, state, batch,
                              rng, given)


class _MergedOp(NamedTuple):
    """A module's op in a program over several phases: the union of its outputs and writes, the phases it
    runs in, and how each read is resolved (``input``, ``slot``, ``fresh``; read carried in some phases:
    ``select`` where its writer runs there too, ``skipped`` where not), with the phases in which it is fresh."""

    op: Op
    phases: frozenset[int]
    reads: tuple[tuple[str, frozenset[int]], ...]


def _fresh_or_carried(fresh_value: Any, carried: Any, fresh: jax.Array, select: bool) -> Any:
    """A read that is fresh in some phases of a merged program and carried in the others. Where its writer is
    skipped (``select`` False) the fresh value already is the carried one, unless the writer's output dtype
    differs from the stored one (bfloat16 parameters, float32 state): then, as under ``select``, the phases
    that read it carried get the stored value, and every phase the stored dtype."""
    same = all(f.dtype == c.dtype for f, c in zip(jax.tree.leaves(fresh_value), jax.tree.leaves(carried)))
    if same and not select:
        return fresh_value
    return jax.tree.map(lambda f, c: jnp.where(fresh, f.astype(c.dtype), c), fresh_value, carried)


def _merge_ops(phases: list[Phase]) -> list[_MergedOp] | None:
    """The module ops of ``phases`` (same providers) as one schedule, in an order every phase agrees with; None
    when the phases call a module differently (its reads or settings) or order their work incompatibly."""
    by_label: dict[str, dict[int, Op]] = {}
    rank: dict[str, tuple[int, int]] = {}
    for ph in phases:
        for pos, op in enumerate(ph.ops):
            if op.role == "module":
                by_label.setdefault(op.name, {})[ph.index] = op
                rank.setdefault(op.name, (pos, ph.index))
    producer: dict[Quantity, str] = {}
    for lbl, ops in by_label.items():
        for op in ops.values():
            for x in op.outputs:
                if producer.setdefault(x, lbl) != lbl:
                    return None
    merged, after = {}, {lbl: set() for lbl in by_label}
    for lbl, ops in by_label.items():
        first = next(iter(ops.values()))
        if any((o.op, o.attrs, o.guard, [r.quantity for r in o.reads]) !=
               (first.op, first.attrs, first.guard, [r.quantity for r in first.reads]) for o in ops.values()):
            return None
        outputs = tuple(dict.fromkeys(x for o in ops.values() for x in o.outputs))
        writes = tuple(dict.fromkeys(x for o in ops.values() for x in o.writes))
        reads = []
        for j, r in enumerate(first.reads):
            seen = {p: o.reads[j] for p, o in ops.items()}
            if len({x.node for x in seen.values()}) != 1:
                return None
            fresh_in = frozenset(p for p, x in seen.items() if x.source == "fresh")
            if r.node.is_input or r.source == "input":  # params, batch, rng; or given (in env from the start)
                reads.append(("input" if r.node.is_input else "fresh", fresh_in))
                continue
            if fresh_in and r.node not in producer:  # a provider's output (providers run first)
                if not all(x.source == "fresh" for x in seen.values()):
                    return None
                reads.append(("fresh", fresh_in))
                continue
            if fresh_in:
                after[lbl].add(producer[r.node])
            if not fresh_in:
                reads.append(("slot", fresh_in))
            elif fresh_in == frozenset(ops):
                reads.append(("fresh", fresh_in))
            else:  # where it is read carried and its writer runs too, the carried value must be selected
                writer = by_label.get(producer[r.node], {})
                carried_in = frozenset(ops) - fresh_in
                reads.append(("select" if carried_in & frozenset(writer) else "skipped", fresh_in))
        merged[lbl] = _MergedOp(dataclasses.replace(first, outputs=outputs, writes=writes), frozenset(ops),
                                tuple(reads))
    order: list[_MergedOp] = []
    done: set[str] = set()
    while len(order) < len(merged):
        ready = [lbl for lbl in merged if lbl not in done and after[lbl] <= done]
        if not ready:
            return None
        lbl = min(ready, key=rank.__getitem__)
        done.add(lbl)
        order.append(merged[lbl])
    return order


def _checked_state(m: Module, state: Any) -> Any:
    """``init``'s state, checked against the NamedTuple its annotation names (the plan's ``state:`` line)."""
    t = state_type(type(m))
    if t is not None and not isinstance(state, t):
        raise LoweringError(
            f"module `{m.label}`: init returned a {type(state).__name__}, but it is annotated to return {t.__name__}",
            where=f"module `{m.label}` ({type(m).__name__}.init)",
            fix=f"return a {t.__name__}(...) from init",
        )
    if t is None and jax.tree.leaves(state):
        raise LoweringError(
            f"module `{m.label}`: init returned state ({type(state).__name__}) without a state type",
            where=f"module `{m.label}` ({type(m).__name__}.init)",
            fix="define a NamedTuple for the state above the module and annotate `def init(...) -> ThatState`",
        )
    return state


def _unpack(m: Module, result: Any) -> tuple[dict, Any, dict]:
    """``apply``'s ``(outputs, state)`` or ``(outputs, state, info)``, with the output names checked."""
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise LoweringError(
            f"module `{m.label}`: apply returned {type(result).__name__}, expected (outputs, state[, info])",
            where=f"module `{m.label}` ({type(m).__name__}.apply)",
            fix="return a tuple (outputs by name, new state) or (outputs, state, telemetry by key)",
        )
    outs, state, info = result if len(result) == 3 else (*result, {})
    names = set(m.output_names())
    if not isinstance(outs, Mapping) or set(outs) != names:
        got = sorted(outs) if isinstance(outs, Mapping) else type(outs).__name__
        raise LoweringError(
            f"module `{m.label}`: apply returned outputs {got}, but the module produces {sorted(names)}",
            where=f"module `{m.label}` ({type(m).__name__}.apply)",
            fix="return one value under each name of `produces()`, and nothing else",
        )
    return dict(outs), state, dict(info)


def lower_plan(plan: Plan, objective: Objective, mesh: Any = None) -> LoweredPlan:
    """Builds the JAX programs of a plan for a model (see `LoweredPlan`).

    ``mesh`` (a ``jax.sharding.Mesh``) is where a placed plan (``compile_plan(..., mesh=...)``) runs: the block
    work of its ``blockwise`` modules is split over the plan's block axes with ``shard_map``.
    """
    return LoweredPlan(plan, objective, mesh)
