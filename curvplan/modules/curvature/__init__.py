"""Curvature operators: turn a provider's linearization into the operator `%curv_op` solvers consume."""

from curvplan.modules.curvature._fisher import EmpiricalFisher as EmpiricalFisher
from curvplan.modules.curvature._fisher import SampledFisher as SampledFisher
from curvplan.modules.curvature._fisher import model_lin as model_lin
from curvplan.modules.curvature._operators import GGN as GGN
from curvplan.modules.curvature._operators import Hessian as Hessian
from curvplan.modules.curvature._operators import curv_op as curv_op
