from __future__ import annotations

from typing import Any, Literal, NamedTuple

import optax
from pydantic import ConfigDict, Field

from curvplan.ir import Hyperparameter, fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module


class UpdateTailState(NamedTuple):
    """The state of the optax chain (momentum trace, schedule count)."""

    opt_state: Any


class UpdateTail(Module):
    """Direction -> ``%update``: optional momentum, global-norm clip, decoupled weight decay, then ``-lr``.

    Built from optax: ``trace`` → ``clip_by_global_norm`` → ``add_decayed_weights`` → ``scale_by_learning_rate``.

    Args:
        learning_rate: a float, an optax schedule ``step -> lr``, or a scalar array (traced under
            ``optax.inject_hyperparams``).
        weight_decay: a float or a scalar array.
        source: which ``%direction.<source>`` to read (``newton``, ``diag``, ...).

    >>> from curvplan.modules import UpdateTail
    >>> [u.quantity.name for u in UpdateTail(source="diag").uses()]
    ['%direction.diag', 'params']
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["update_tail"] = "update_tail"
    learning_rate: Hyperparameter(ge=0, schedule=True) = 1.0
    source: str = "newton"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: Hyperparameter(ge=0) = 0.0
    clip_norm: float | None = Field(None, gt=0)

    def consumes(self):
        return {"direction": fresh(q.direction(self.source)), "params": fresh(q.params())}

    def produces(self):
        return {"update": q.update()}

    def transform(self) -> optax.GradientTransformation:
        parts = []
        if self.momentum:
            parts.append(optax.trace(decay=self.momentum, nesterov=self.nesterov))
        if self.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(self.clip_norm))
        if not (isinstance(self.weight_decay, float) and self.weight_decay == 0.0):
            parts.append(optax.add_decayed_weights(self.weight_decay))
        parts.append(optax.scale_by_learning_rate(self.learning_rate))
        return optax.chain(*parts)

    def init(self, params, ctx) -> UpdateTailState:
        return UpdateTailState(self.transform().init(params))

    def apply(self, inputs, state: UpdateTailState, ctx):
        updates, opt_state = self.transform().update(inputs.direction, state.opt_state, inputs.params)
        return {"update": updates}, UpdateTailState(opt_state)
