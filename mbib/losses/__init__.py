"""The pure loss maths of BIB / MBIB (Lan et al.) and the long-tail baselines: functions of logits, labels and
class counts (Eq. 4-13, Appendix J; text-vs-code differences in functional's docstring). The methods that train
with them (loss modules, tasks, registry) are mbib.methods, one layer up.
"""

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

__all__ = [
    "ClassConstants", "DEFAULT_BETA", "balanced_ce", "bib_loss", "bib_loss_terms", "bib_pairs", "class_constants",
    "class_weights", "drw_weights", "focal_loss", "ldam_loss", "ldam_margins", "mbib_loss", "mbib_loss_terms",
    "tap_weights", "temperatures", "vsd_loss",
]
