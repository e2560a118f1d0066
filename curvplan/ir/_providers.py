"""Provider rules: how the model is turned into base quantities (docs/architecture.md §3).

Providers are not listed by the user. For each phase the planner picks the cheapest set of rules whose
``provides`` cover what the active modules need. New rules can be registered (the JAX side registers an
implementation under the same name in `curvplan.lowering`).

>>> from curvplan.ir import PROVIDERS
>>> sorted(PROVIDERS)  # doctest: +NORMALIZE_WHITESPACE
['layer_io', 'layer_io_sampled', 'linearize_grad', 'linearize_model', 'loss_only', 'per_example_grads',
 'value_and_grad']
>>> PROVIDERS["linearize_grad"].cost
2.5
"""

from __future__ import annotations

from dataclasses import dataclass

from curvplan.ir import quantities as q
from curvplan.ir._quantity import Quantity


@dataclass(frozen=True)
class ProviderRule:
    """A way to compute base quantities from ``params`` and ``batch``.

    Attributes:
        name: the op name in plan text (``linearize_grad``).
        provides: quantities one call yields.
        cost: rough cost in gradient evaluations.
        inputs: input quantities it reads.
    """

    name: str
    provides: frozenset[Quantity]
    cost: float
    inputs: tuple[Quantity, ...] = (q.params(), q.batch())


PROVIDERS: dict[str, ProviderRule] = {}


def register_provider(rule: ProviderRule, *, replace: bool = False) -> ProviderRule:
    """Adds a provider rule to the registry the planner chooses from."""
    if rule.name in PROVIDERS and not replace:
        raise ValueError(f"a provider named {rule.name!r} is already registered; pass replace=True")
    if rule.cost <= 0:
        raise ValueError(f"provider {rule.name!r}: cost must be positive, got {rule.cost}")
    PROVIDERS[rule.name] = rule
    return rule


for _rule in (
    ProviderRule("loss_only", frozenset({q.loss()}), 0.4),
    ProviderRule("value_and_grad", frozenset({q.loss(), q.grad()}), 1.0),
    ProviderRule("linearize_grad", frozenset({q.loss(), q.grad(), q.hvp_op("hessian")}), 2.5),
    ProviderRule(
        "linearize_model",
        frozenset({q.loss(), q.grad(), q.outputs(), q.ggn_op("mse"), q.ggn_op("ce"), q.fisher_op("sampled"),
                   q.model_lin()}),
        1.3,
        (q.params(), q.batch(), q.rng()),
    ),
    ProviderRule("layer_io", frozenset({q.loss(), q.grad(), q.activations(), q.out_cotangents()}), 1.1),
    # the same plus the cotangents at labels drawn from the model's predictive (a second backward pass)
    ProviderRule("layer_io_sampled",
                 frozenset({q.loss(), q.grad(), q.activations(), q.out_cotangents(labels="sampled")}), 2.2,
                 (q.params(), q.batch(), q.rng())),
    # per-example gradients (vmap of grad over the batch): the empirical Fisher (1/B) Σ_b g_b g_bᵀ
    ProviderRule("per_example_grads", frozenset({q.loss(), q.grad(), q.fisher_op("empirical")}), 1.6),
):
    register_provider(_rule)
