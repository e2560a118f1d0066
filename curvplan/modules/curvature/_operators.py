from __future__ import annotations

from typing import Literal

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module

curv_op = q.curv_op


class Hessian(Module):
    """The exact Hessian of the loss as `%curv_op` (forward-over-reverse HVPs; indefinite in general).

    >>> from curvplan.modules import Hessian
    >>> [x.name for x in Hessian().outputs()]
    ['%curv_op']
    """

    kind: Literal["hessian"] = "hessian"

    def consumes(self):
        return {"hvp": fresh(q.hvp_op("hessian"))}

    def produces(self):
        return {"op": curv_op()}

    def apply(self, inputs, state, ctx):
        return {"op": inputs.hvp}, state


class GGN(Module):
    """The generalized Gauss-Newton matrix Jᵀ H_F J / B for an ``mse`` or ``ce`` loss, as `%curv_op`.

    For softmax cross-entropy it equals the Fisher. Needs the objective's ``model_fn`` and loss kind.
    """

    kind: Literal["ggn"] = "ggn"
    loss: Literal["mse", "ce"] = "ce"

    def consumes(self):
        return {"ggn": fresh(q.ggn_op(self.loss))}

    def produces(self):
        return {"op": curv_op()}

    def apply(self, inputs, state, ctx):
        return {"op": inputs.ggn}, state
