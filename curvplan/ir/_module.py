"""The declaration side of the module contract (pure Python; the JAX side lives in `curvplan.modules`).

A `ModuleSpec` is a frozen pydantic model with a ``kind`` discriminator. It declares, once and by its own
names, what it consumes (each use ``fresh`` or ``carried``) and what it produces, and when it runs. The
planner reads the quantities; lowering hands ``apply`` its inputs by those names and takes its outputs back by
them, applying ``tag`` / ``take`` itself, so a module never builds a quantity key:

>>> from typing import Literal
>>> from curvplan.ir import ModuleSpec, fresh, quantities as q
>>> class Scale(ModuleSpec):
...     kind: Literal["scale_doc"] = "scale_doc"
...     factor: float = 1.0
...     def consumes(self): return {"grad": fresh(q.grad())}
...     def produces(self): return {"update": q.update()}
>>> Scale(factor=0.5, every=2).cadence
@every(2)
>>> [u.quantity.name for u in Scale(take=(("grad", "clipped"),)).uses()]
['%grad:clipped']
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, ValidationError, model_validator

from curvplan.ir._cadence import Cadence
from curvplan.ir._errors import ConfigError
from curvplan.ir._quantity import Quantity

Freshness = Literal["fresh", "carried"]
_BASE_FIELDS = frozenset({"kind", "name", "cadence", "tag", "take"})
_CADENCE_KEYS = ("every", "offset", "start", "stop")

MODULE_KINDS: dict[str, type[ModuleSpec]] = {}


class Use(NamedTuple):
    """A consumed quantity and its freshness."""

    quantity: Quantity
    freshness: Freshness = "fresh"


def fresh(q: Quantity) -> Use:
    """The consumer needs ``q`` computed in the same step."""
    return Use(q, "fresh")


def carried(q: Quantity) -> Use:
    """The consumer accepts the last computed value of ``q`` (kept in the optimizer state)."""
    return Use(q, "carried")


def _array_like(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (int, float))


def Hyperparameter(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                   schedule: bool = False) -> Any:
    """A field type for a hyperparameter that may be traced: a finite number within the bounds, a scalar
    array (``optax.inject_hyperparams`` hands the factory traced arrays, which are checked only once they are
    concrete), or, with ``schedule=True``, a callable ``step -> value``.

    >>> from pydantic import BaseModel
    >>> class M(BaseModel):
    ...     lr: Hyperparameter(gt=0, schedule=True) = 1.0
    >>> M(lr=0.5).lr, M(lr=lambda t: 0.1).model_dump()["lr"]
    (0.5, '<schedule <lambda>>')
    >>> M(lr=float("nan"))
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for M
    ...
    """

    def check_number(x: float) -> None:
        if not math.isfinite(x):
            raise ValueError(f"must be finite, got {x}")
        for bound, ok, word in ((gt, lambda b: x > b, ">"), (ge, lambda b: x >= b, ">="),
                                (lt, lambda b: x < b, "<")):
            if bound is not None and not ok(bound):
                raise ValueError(f"must be {word} {bound}, got {x}")

    def validate(v: Any) -> Any:
        if isinstance(v, bool) or isinstance(v, str):
            raise ValueError(f"expected a number, got {v!r}")
        if _array_like(v):
            if tuple(v.shape) != ():
                raise ValueError(f"expected a scalar, got an array of shape {tuple(v.shape)}")
            try:
                x = float(v)
            except Exception:  # a tracer: its value is known only inside the step
                return v
            check_number(x)
            return v
        if callable(v):
            if not schedule:
                raise ValueError("a schedule (callable) is not accepted here; give a number")
            return v
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {type(v).__name__}") from None
        check_number(x)
        return x

    def serialize(v: Any) -> Any:
        if isinstance(v, (int, float)):
            return v
        if _array_like(v):
            try:
                return float(v)
            except Exception:
                return "<traced>"
        return f"<schedule {getattr(v, '__name__', type(v).__name__)}>"

    return Annotated[Any, BeforeValidator(validate), PlainSerializer(serialize, return_type=Any)]


class ModuleSpec(BaseModel):
    """Base of every module declaration (the runnable base, `curvplan.modules.Module`, adds the JAX side).

    Subclasses add ``kind: Literal["..."] = "..."``, their config fields, and override `consumes` and
    `produces`, each a mapping from the module's own names to quantities. Common fields:

    - ``name``: unique in a composition; defaults to ``kind`` (``kind_1``, ... when several differ).
    - ``cadence`` (or the shortcuts ``every=``, ``offset=``, ``start=``, ``stop=``): when it runs. ``None``
      means "whenever a fresh consumer needs my outputs, else every step".
    - ``tag``: labels this module's outputs so that consumers can choose between two producers.
    - ``take``: ``(("diag.hessian", "gnb"),)`` reads the quantity ``%diag.hessian`` tagged ``gnb``.

    The state a module keeps is not declared: its names are the fields of the NamedTuple that ``init`` is
    annotated to return (`state_names`), and lowering checks that ``init`` returns one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # NaN / ±Inf settings are refused

    kind: str
    name: str | None = None
    cadence: Cadence | None = None
    tag: str | None = None
    take: tuple[tuple[str, str], ...] = ()

    sink: ClassVar[bool] = False
    """True when the module must run even if nothing reads its outputs (telemetry, the update)."""
    info_fields: ClassVar[tuple[tuple[str, str], ...]] = ()
    """Telemetry ``(key, dtype)`` pairs (dtype ``float`` / ``int`` / ``bool``): the keys ``apply`` may return
    in its info mapping, and the schema of `StepInfo`."""
    nonfinite_outputs: ClassVar[tuple[str, ...]] = ()
    """Carried outputs whose NaN is a value, not a fault (a gain ratio no valid model gave): the step guard,
    which does not apply a step whose new state is not finite, leaves them out."""
    blockwise: ClassVar[bool] = False
    """True when the module does the same matrix work for many blocks (factorizations, roots, rotations,
    Newton-Schulz) through ``ctx.blocks``: on a mesh the plan spreads that work over the devices."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("kind")
        default = field.default if field is not None else None
        if isinstance(default, str) and default:
            MODULE_KINDS[default] = cls

    def __init__(self, **data: Any):
        kind = type(self).model_fields["kind"].default
        name = data.get("name") or kind
        try:
            super().__init__(**data)
        except ValidationError as e:
            inner = [x.get("ctx", {}).get("error") for x in e.errors()]
            own = next((x for x in inner if isinstance(x, ConfigError)), None)
            if own is not None:  # a check of the module's own: raised once, naming the module
                raise ConfigError(own.what, where=f"module `{name}`", fix=own.fix) from None
            raise ConfigError(
                f"invalid configuration for module `{name}` ({type(self).__name__}):\n{e}",
                where=f"module `{name}`",
                fix="change the fields named above; `help(" + type(self).__name__ + ")` lists them",
            ) from e

    @model_validator(mode="before")
    @classmethod
    def _fold_cadence(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in _CADENCE_KEYS):
            data = dict(data)
            parts = {k: data.pop(k) for k in _CADENCE_KEYS if k in data}
            if data.get("cadence") is not None:
                raise ValueError("give either cadence= or every=/offset=/start=/stop=, not both")
            data["cadence"] = Cadence(**parts)
        return data

    # -- declarations (override) ------------------------------------------------------------------------
    def consumes(self) -> Mapping[str, Use]:
        """What this module reads: its own input name -> the quantity, `fresh` or `carried`."""
        return {}

    def produces(self) -> Mapping[str, Quantity]:
        """What this module writes: its own output name -> the quantity (untagged)."""
        return {}

    # -- derived ----------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """The module's name (its ``kind`` unless named)."""
        return self.name or self.kind

    def uses(self) -> tuple[Use, ...]:
        """The consumed quantities in declaration order, with ``take`` selections applied."""
        taken = dict(self.take)
        out = []
        for u in _values(self.consumes()):
            t = taken.get(u.quantity.name.lstrip("%"))
            out.append(Use(u.quantity.with_attrs(tag=t), u.freshness) if t else u)
        return tuple(out)

    def outputs(self) -> tuple[Quantity, ...]:
        """The produced quantities in declaration order, with ``tag`` applied."""
        qs = tuple(_values(self.produces()))
        return tuple(x.with_attrs(tag=self.tag) for x in qs) if self.tag else qs

    def input_names(self) -> tuple[str, ...]:
        """The module's names for `uses`, in the same order."""
        return tuple(self.consumes())

    def output_names(self) -> tuple[str, ...]:
        """The module's names for `outputs`, in the same order."""
        return tuple(self.produces())

    def state_names(self) -> tuple[str, ...]:
        """The fields of the state this module keeps: those of the NamedTuple ``init`` is annotated to return
        (``()`` for a stateless module)."""
        t = state_type(type(self))
        return tuple(t._fields) if t is not None else ()

    def settings(self) -> tuple[tuple[str, Any], ...]:
        """All of the module's own settings (base fields excluded), sorted."""
        dump = self.model_dump(mode="json")
        return tuple(sorted((k, _freeze(v)) for k, v in dump.items() if k not in _BASE_FIELDS))

    def config(self) -> tuple[tuple[str, Any], ...]:
        """The settings printed as op attributes in plan text: those that differ from their defaults, so a
        changed default shows only where it matters."""
        dump = self.model_dump(mode="json")  # traced values dump as "<traced>": never compared as arrays
        out = []
        for k, field in type(self).model_fields.items():
            if k in _BASE_FIELDS:
                continue
            v = _freeze(dump[k])
            if field.is_required() or not _plain(field.default) or v != _freeze(field.default):
                out.append((k, v))
        return tuple(sorted(out))

    def identity(self) -> tuple:
        """Equal identities mean interchangeable modules (dedup merges them)."""
        return (self.kind, self.cadence and str(self.cadence), self.tag, self.take, self.settings())

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=True) | {"kind": self.kind}


def _plain(v: Any) -> bool:
    """A default that compares with ``==`` as its JSON dump does (numbers, strings, None, tuples of them)."""
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _values(decl: Any) -> list:
    """The values of a declaration (a mapping; anything else is refused by `compile_plan` with a PlanError)."""
    return list(decl.values()) if isinstance(decl, Mapping) else list(decl)


def state_type(cls: type) -> type | None:
    """The NamedTuple class that ``cls.init`` is annotated to return, or None (no annotation, or not a
    NamedTuple). Reads the annotation only: nothing is traced or imported."""
    init = getattr(cls, "init", None)
    if init is None:
        return None
    ann = inspect.signature(init).return_annotation
    if isinstance(ann, str):
        try:
            ann = eval(ann, getattr(init, "__globals__", {}))  # noqa: S307  (an annotation of our own code)
        except Exception:
            return None
    return ann if isinstance(ann, type) and issubclass(ann, tuple) and hasattr(ann, "_fields") else None


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def module_from_dict(d: dict) -> ModuleSpec:
    """Rebuilds a module from `ModuleSpec.to_dict` (its class must have been imported)."""
    kind = d.get("kind")
    cls = MODULE_KINDS.get(kind)
    if cls is None:
        raise ConfigError(
            f"unknown module kind {kind!r}",
            where=f"module dict {d!r}",
            fix="import the package that defines this module before loading the plan",
        )
    return cls(**d)
