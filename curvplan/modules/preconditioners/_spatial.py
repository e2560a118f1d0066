"""AdaHessian's spatial averaging of a diagonal estimate, on flax's kernel axes (docs/math.md §5)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module


def spatial_average(d: jax.Array, *, absolute: bool = True, dense_inputs: bool = False) -> jax.Array:
    """Averages one leaf of a diagonal estimate over its kernel's spatial axes (shape kept).

    Flax conv kernels are ``(*spatial, in, out)``: a leaf with ndim >= 3 is averaged over its leading
    ``ndim - 2`` axes (kh, kw for 2-D convs). Dense ``(in, out)`` kernels are left alone unless
    ``dense_inputs`` (then averaged over the input axis 0, Somax's choice written for flax). Vectors and
    scalars are left alone. ``absolute`` averages |d| (the original AdaHessian code).

    Examples:
        >>> import jax.numpy as jnp
        >>> d = jnp.arange(8.0).reshape(2, 2, 1, 2)        # (kh, kw, in, out)
        >>> spatial_average(d)[..., 0, :].tolist()
        [[[3.0, 4.0], [3.0, 4.0]], [[3.0, 4.0], [3.0, 4.0]]]
    """
    x = jnp.abs(d) if absolute else d
    if d.ndim >= 3:
        axes = tuple(range(d.ndim - 2))
    elif d.ndim == 2 and dense_inputs:
        axes = (0,)
    else:
        return x
    return jnp.broadcast_to(jnp.mean(x, axis=axes, keepdims=True), d.shape)


class SpatialAverage(Module):
    """Spatially averaged ``%diag.curvature[..., spatial=mean]`` from a ``%diag.curvature[...]`` estimate.

    Args:
        estimate: attributes of the estimate to average (as in `DiagEMA`).
        absolute: average |d| (AdaHessian) instead of d.
        dense_inputs: also average dense ``(in, out)`` kernels over their input axis.

    >>> from curvplan.modules.preconditioners._spatial import SpatialAverage
    >>> SpatialAverage().outputs()
    (diag[curvature; est=hutchinson, probes=1, spatial=mean],)
    """

    kind: Literal["spatial_average"] = "spatial_average"
    estimate: tuple[tuple[str, int | str], ...] = (("est", "hutchinson"), ("probes", 1))
    absolute: bool = True
    dense_inputs: bool = False

    def consumes(self):
        return {"curvature": fresh(q.diag("curvature", **dict(self.estimate)))}

    def produces(self):
        return {"curvature": q.diag("curvature", **dict(self.estimate), spatial="mean")}

    def apply(self, inputs, state, ctx):
        def avg(x):
            return spatial_average(x, absolute=self.absolute, dense_inputs=self.dense_inputs)

        return {"curvature": jax.tree.map(avg, inputs.curvature)}, state
