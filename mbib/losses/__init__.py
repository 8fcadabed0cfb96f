"""Losses of BIB / MBIB (Lan et al.) and the long-tail baselines, behind one build_criterion interface.

functional: pure maths (Eq. 4-13, Appendix J; text-vs-code differences in its docstring);
criteria: nn.Module losses with cached per-class constants, and the built-in methods' registrations;
registry: the one method registry (name -> head, loss, defaults, training task).
Each method registers beside its code; the imports at the end load every method module, so METHODS is complete.
"""

from mbib.losses.criteria import BIBCriterion, Criterion, LDAMDRWCriterion, SingleHeadCriterion
from mbib.losses.functional import (
    DEFAULT_BETA,
    ClassConstants,
    balanced_ce,
    bib_loss,
    bib_loss_terms,
    bib_pairs,
    class_constants,
    class_weights,
    drw_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    mbib_loss,
    mbib_loss_terms,
    tap_weights,
    temperatures,
    vsd_loss,
)
from mbib.losses.registry import (
    METHOD_MODEL_OPTIONS,
    METHODS,
    build_criterion,
    method_defaults,
    method_recipe,
    method_settings,
    method_task,
    register_method,
)

__all__ = [
    "BIBCriterion", "ClassConstants", "Criterion", "DEFAULT_BETA", "LDAMDRWCriterion", "METHODS",
    "METHOD_MODEL_OPTIONS", "SingleHeadCriterion", "balanced_ce", "bib_loss", "bib_loss_terms", "bib_pairs",
    "build_criterion", "class_constants", "class_weights", "drw_weights", "focal_loss", "ldam_loss",
    "ldam_margins", "mbib_loss", "mbib_loss_terms", "method_defaults", "method_recipe", "method_settings", "method_task",
    "register_method", "tap_weights", "temperatures", "vsd_loss",
]

# the method modules outside criteria.py, one line each: importing them registers their methods
from mbib.losses import logit_adjust  # noqa: E402, F401  "la"
from mbib import gml  # noqa: E402, F401  "gml", "mbib-gml"
