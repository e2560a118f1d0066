from __future__ import annotations

from typing import Literal

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module


def curv_op():
    """The curvature operator v -> C v that estimators and solvers consume."""
    return q.quantity("curv_op")


class Hessian(Module):
    """The exact Hessian of the loss as `%curv_op` (forward-over-reverse HVPs; indefinite in general).

    >>> from curvplan.modules import Hessian
    >>> [x.name for x in Hessian().outputs()]
    ['%curv_op']
    """

    kind: Literal["hessian"] = "hessian"
    cost = 0.0

    def consumes(self):
        return (fresh(q.hvp_op("hessian")),)

    def produces(self):
        return (curv_op(),)

    def apply(self, inputs, state, ctx):
        return {curv_op(): inputs[q.hvp_op("hessian")]}, state


class GGN(Module):
    """The generalized Gauss-Newton matrix Jᵀ H_F J / B for an ``mse`` or ``ce`` loss, as `%curv_op`.

    For softmax cross-entropy it equals the Fisher. Needs the objective's ``model_fn`` and loss kind.
    """

    kind: Literal["ggn"] = "ggn"
    loss: Literal["mse", "ce"] = "ce"
    cost = 0.0

    def consumes(self):
        return (fresh(q.ggn_op(self.loss)),)

    def produces(self):
        return (curv_op(),)

    def apply(self, inputs, state, ctx):
        return {curv_op(): inputs[q.ggn_op(self.loss)]}, state
