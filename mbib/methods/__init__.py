"""The training methods: one module per method family, each with its loss module, its training task, its
registration and its paper defaults; the registry (name -> head, loss, defaults, task); the Task base and the VSD ramp.

Layers: the pure loss maths (mbib.losses.functional) and the models sit below; the training loop (mbib.train) above
builds a run's method through this registry only. Adding a method is its module plus one import line below.
"""

from mbib.methods.criterion import Criterion
from mbib.methods.registry import (
    METHOD_MODEL_OPTIONS,
    METHODS,
    build_criterion,
    config_hparam,
    method_defaults,
    method_recipe,
    method_settings,
    method_task,
    register_method,
)
from mbib.methods.task import Task

__all__ = [
    "Criterion", "METHODS", "METHOD_MODEL_OPTIONS", "Task", "build_criterion", "config_hparam", "method_defaults",
    "method_recipe", "method_settings", "method_task", "register_method",
]

# the method families, one line each: importing a module registers its methods
from mbib.methods import single_head  # noqa: E402, F401  "ce", "focal", "bsce", "bsce-mlp"
from mbib.methods import ldam  # noqa: E402, F401  "ldam-drw"
from mbib.methods import bib  # noqa: E402, F401  "bib", "mbib", "se-mbib", "all-mbib", Appendix B ablations
from mbib.methods import logit_adjust  # noqa: E402, F401  "la"
from mbib.methods import gml  # noqa: E402, F401  "gml", "mbib-gml"
