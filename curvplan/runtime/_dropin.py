"""Drop-in optax transformations built from presets (the entry points shaped like the originals)."""

from __future__ import annotations

from typing import Any

from curvplan.modules.preconditioners._scao import scao_modules
from curvplan.runtime._optax import as_optax


def scao(
    learning_rate: Any = 3.5e-4,
    weight_decay: float = 0.1,
    warmup_steps: int = 100,
    precond_freq: int = 10,
    **kwargs: Any,
):
    """SCAO as a drop-in AdamW replacement: an ``optax.GradientTransformationExtraArgs`` that uses only the
    incoming gradient (other keywords as in `scao_modules`).

    >>> import jax.numpy as jnp, optax
    >>> from curvplan import scao
    >>> tx = scao(warmup_steps=2, precond_freq=1, blend_steps=2, min_precond_updates=1)
    >>> w = {"w": jnp.ones((3, 2))}; state = tx.init(w)
    >>> for _ in range(5):
    ...     updates, state = tx.update({"w": jnp.ones((3, 2))}, state, w)
    >>> updates["w"].shape
    (3, 2)
    """
    mods = scao_modules(learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        precond_freq=precond_freq, **kwargs)
    return as_optax(mods)
