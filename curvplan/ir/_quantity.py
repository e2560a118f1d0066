"""Quantities: the values one optimizer step may compute, identified by structure.

A quantity is ``kind`` + optional ``subject`` + sorted ``attrs`` + ``scope``. Building an equal quantity
twice returns the same object (hash-consing), so two modules that both consume ``grad()`` share one node
by construction.

>>> from curvplan.ir import quantities as q
>>> q.hvp_op("hessian") is q.hvp_op("hessian")
True
>>> q.hvp_op("hessian").name
'%hvp_op.hessian'
>>> q.diag("hessian", est="hutchinson", probes=1)
diag[hessian; est=hutchinson, probes=1]
"""

from __future__ import annotations

from typing import Any, ClassVar

Scalar = str | int | float | bool | None
INPUT_KINDS = frozenset({"params", "batch", "rng"})


def _check_attr_value(key: str, value: Any) -> Any:
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple):
        return tuple(_check_attr_value(key, v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"quantity attribute {key}={value!r} must be a str/int/float/bool/None or a tuple of them")


class Quantity:
    """A hash-consed, immutable quantity key. Construct through the helpers in `quantities`."""

    __slots__ = ("kind", "subject", "attrs", "scope", "_key", "__weakref__")
    _cache: ClassVar[dict[tuple, Quantity]] = {}

    kind: str
    subject: str | None
    attrs: tuple[tuple[str, Any], ...]
    scope: str

    def __new__(cls, kind: str, subject: str | None = None, attrs: Any = (), scope: str = "all"):
        if not kind or not kind.replace("_", "").isalnum():
            raise ValueError(f"quantity kind must be an identifier, got {kind!r}")
        items = dict(attrs).items() if not isinstance(attrs, dict) else attrs.items()
        norm = tuple(sorted((str(k), _check_attr_value(k, v)) for k, v in items))
        typed = tuple((k, type(v).__name__, v) for k, v in norm)  # 1, 1.0 and True stay distinct
        key = (kind, subject, typed, scope)
        found = cls._cache.get(key)
        if found is not None:
            return found
        self = object.__new__(cls)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "attrs", norm)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "_key", key)
        cls._cache[key] = self
        return self

    def __setattr__(self, name, value):
        raise AttributeError("Quantity is immutable; use .replace(...)")

    def __delattr__(self, name):
        raise AttributeError("Quantity is immutable")

    def __reduce__(self):
        return (Quantity, (self.kind, self.subject, self.attrs, self.scope))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Quantity) and self._key == other._key)

    def __lt__(self, other: Quantity) -> bool:
        return self.sort_key < other.sort_key

    @property
    def sort_key(self) -> tuple:
        return (self.kind, self.subject or "", repr(self.attrs), self.scope)

    @property
    def is_input(self) -> bool:
        """True for ``params``, ``batch`` and ``rng``: values given to every step."""
        return self.kind in INPUT_KINDS

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    def replace(self, **changes: Any) -> Quantity:
        """Returns the quantity with some of kind/subject/attrs/scope changed (``self`` if none change)."""
        fields = dict(kind=self.kind, subject=self.subject, attrs=self.attrs, scope=self.scope)
        fields.update(changes)
        return Quantity(**fields)

    def with_attrs(self, **attrs: Any) -> Quantity:
        return self.replace(attrs={**dict(self.attrs), **attrs})

    @property
    def name(self) -> str:
        """The short printed name: ``%kind.subject`` (plus ``[scope]``). Plans add ``_1`` on collisions."""
        if self.is_input:
            return self.kind
        base = "%" + self.kind + (f".{self.subject}" if self.subject else "")
        if self.scope != "all":
            base += f"[{self.scope}]"
        attrs = dict(self.attrs)
        if attrs.get("tag"):
            base += f":{attrs['tag']}"
        if attrs.get("instance"):  # a private copy (unplanned baseline: one provider per module)
            base += f"/{attrs['instance']}"
        return base

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in self.attrs)
        head = self.subject or ""
        if inner:
            head = f"{head}; {inner}" if head else inner
        scope = "" if self.scope == "all" else f"@{self.scope}"
        return f"{self.kind}[{head}]{scope}" if head else f"{self.kind}{scope}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "subject": self.subject, "attrs": [list(a) for a in self.attrs],
                "scope": self.scope}

    @staticmethod
    def from_dict(d: dict) -> Quantity:
        return Quantity(d["kind"], d.get("subject"), [tuple(a) for a in d.get("attrs", ())], d.get("scope", "all"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)
