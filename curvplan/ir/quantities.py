"""Constructors for the quantity kinds of docs/architecture.md §2.

>>> from curvplan.ir import quantities as q
>>> [x.name for x in (q.loss(), q.grad(), q.ggn_op("ce"), q.kron("grad_gram"))]
['%loss', '%grad', '%ggn_op.ce', '%kron.grad_gram']
"""

from __future__ import annotations

from typing import Any

from curvplan.ir._quantity import Quantity

__all__ = [
    "params", "batch", "rng", "loss", "grad", "outputs", "hvp_op", "ggn_op", "fisher_op", "diag", "trace",
    "eigvals", "kron", "eigbasis", "activations", "out_cotangents", "direction", "update", "lam", "rho",
    "loss_after", "curv_op", "precond_diag", "model_lin", "probes", "quantity",
]


def quantity(kind: str, subject: str | None = None, *, scope: str = "all", **attrs: Any) -> Quantity:
    """A quantity of any kind (for kinds this module has no helper for)."""
    return Quantity(kind, subject, attrs, scope)


def params() -> Quantity:
    return Quantity("params")


def batch() -> Quantity:
    return Quantity("batch")


def rng() -> Quantity:
    return Quantity("rng")


def loss() -> Quantity:
    """The minibatch loss at the current parameters."""
    return Quantity("loss")


def grad(scope: str = "all") -> Quantity:
    """The minibatch gradient."""
    return Quantity("grad", scope=scope)


def outputs() -> Quantity:
    """The model outputs (logits / predictions) on the batch."""
    return Quantity("outputs")


def hvp_op(of: str = "hessian") -> Quantity:
    """A linear operator v -> C v for a curvature matrix (``hessian``)."""
    return Quantity("hvp_op", of)


def ggn_op(loss_kind: str) -> Quantity:
    """The Gauss-Newton operator v -> Jᵀ H_F J v for ``mse`` or ``ce`` losses."""
    return Quantity("ggn_op", loss_kind)


def fisher_op(kind: str = "empirical") -> Quantity:
    return Quantity("fisher_op", kind)


def diag(of: str, **attrs: Any) -> Quantity:
    """A diagonal estimate of a curvature matrix, e.g. ``diag("hessian", est="hutchinson", probes=1)``."""
    return Quantity("diag", of, attrs)


def trace(of: str, **attrs: Any) -> Quantity:
    return Quantity("trace", of, attrs)


def eigvals(of: str, **attrs: Any) -> Quantity:
    return Quantity("eigvals", of, attrs)


def kron(of: str, *, scope: str = "all", **attrs: Any) -> Quantity:
    """Per-layer Kronecker factors: ``grad_gram`` (GGᵀ, GᵀG) or ``kfac`` (A, Γ)."""
    return Quantity("kron", of, attrs, scope)


def eigbasis(of: Quantity, **attrs: Any) -> Quantity:
    """Eigenbases of every factor in a ``kron`` quantity."""
    return Quantity("eigbasis", of.subject, {"of": of.kind, **attrs}, of.scope)


def activations(scope: str = "all") -> Quantity:
    return Quantity("activations", scope=scope)


def out_cotangents(scope: str = "all", *, labels: str = "true") -> Quantity:
    """Layer output cotangents of the mean loss: at the batch's labels (``"true"``: the empirical Fisher) or at
    labels sampled from the model's predictive (``"sampled"``: an unbiased one-sample estimate of the Fisher)."""
    return Quantity("out_cotangents", None if labels == "true" else labels, scope=scope)


def direction(name: str, *, scope: str = "all", **attrs: Any) -> Quantity:
    """A search direction produced by a solver or preconditioner."""
    return Quantity("direction", name, attrs, scope)


def update(scope: str = "all") -> Quantity:
    """The final parameter update of the step (the plan's output)."""
    return Quantity("update", scope=scope)


def lam() -> Quantity:
    """The damping strength lambda."""
    return Quantity("lambda")


def rho() -> Quantity:
    """The trust-region gain ratio."""
    return Quantity("rho")


def loss_after() -> Quantity:
    return Quantity("loss_after")


def curv_op() -> Quantity:
    """The curvature operator ``v -> C v`` that estimators and solvers consume (Hessian, GGN or Fisher)."""
    return Quantity("curv_op")


def precond_diag() -> Quantity:
    """A diagonal preconditioner (the bias-corrected EMA of a diagonal curvature estimate)."""
    return Quantity("precond", "diag")


def model_lin() -> Quantity:
    """The model linearized on the batch (outputs, targets, jvp, vjp, per-example residual); produced by the
    ``linearize_model`` provider, consumed by the row-space (Woodbury) solvers."""
    return Quantity("model_lin")


def probes(num: int) -> Quantity:
    """Rademacher probes ``z_s`` and their curvature products ``C z_s`` (``num`` of them), shared by the
    Hutchinson diagonal and trace estimates."""
    return Quantity("probes", "curvature", {"probes": num})
