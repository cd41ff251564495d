"""Fine-tuning methods behind one contract (:mod:`weatherpeft.methods.base`); the lookup
(:mod:`weatherpeft.methods.registry`) imports and so registers every built-in method."""

from weatherpeft.methods.base import Adaptation, BudgetError, ParameterReport, register_method
from weatherpeft.methods.registry import apply_method, describe_methods, get_method, method_names

__all__ = ["Adaptation", "BudgetError", "ParameterReport", "apply_method", "describe_methods", "get_method",
           "method_names", "register_method"]
