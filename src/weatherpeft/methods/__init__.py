"""Fine-tuning methods behind one contract (:mod:`weatherpeft.methods.base`); importing this
package registers every built-in method."""

from weatherpeft.methods import adaptformer, child_tuning, frozen, full, hf_peft, sfas, ssf, vpt, weatherpeft  # noqa: F401  (each registers methods)  # noqa: F401
from weatherpeft.methods.base import (
                                      Adaptation,
                                      BudgetError,
                                      ParameterReport,
                                      apply_method,
                                      get_method,
                                      method_names,
                                      register_method,
)

__all__ = ["Adaptation", "BudgetError", "ParameterReport", "apply_method", "get_method",
           "method_names", "register_method"]
