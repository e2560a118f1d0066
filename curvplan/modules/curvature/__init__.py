"""Curvature operators: turn a provider's linearization into the operator `%curv_op` solvers consume."""

from curvplan.modules.curvature._fisher import EmpiricalFisher, SampledFisher, model_lin
from curvplan.modules.curvature._operators import GGN, Hessian, curv_op

__all__ = ["Hessian", "GGN", "EmpiricalFisher", "SampledFisher", "curv_op", "model_lin"]
