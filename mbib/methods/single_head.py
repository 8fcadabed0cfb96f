"""One head, one loss: cross entropy, focal loss and balanced softmax (BSCE) on the final tap, or BSCE on z."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from mbib.losses import functional as L
from mbib.methods.criterion import Criterion
from mbib.methods.registry import register_method


class SingleHeadCriterion(Criterion):
    """One head, one loss: "ce", "focal", "bsce" on the final tap, "bsce-mlp" on z."""

    def __init__(self, method: str, head: str, class_counts: Tensor, *, kind: str, key: str = "final",
                 m: float = 0.0, focal_gamma: float = 1.0, weighted_mean: str = "weights") -> None:
        super().__init__(method, head, class_counts)
        self.kind = L.check_choice("kind", kind, ("ce", "focal", "bsce"))
        self.key = key
        self.focal_gamma = L.check_nonnegative("focal_gamma", focal_gamma)
        self.weighted_mean = L.check_choice("weighted_mean", weighted_mean, L.WEIGHTED_MEANS)
        consts = L.class_constants(class_counts, m, 0.0, logit_adjust=True)
        self.register_buffer("log_prior", consts.log_prior, persistent=False)
        self.register_buffer("weights", consts.weights, persistent=False)
        self.register_buffer("temperature", consts.temperature, persistent=False)

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        key = self.final_tap(outputs) if self.key == "final" else self.key
        logits = self.logits(outputs, [key])[key]
        if self.kind == "ce":
            loss = F.cross_entropy(logits, labels)
        elif self.kind == "focal":
            loss = L.focal_loss(logits, labels, self.focal_gamma)
        else:
            consts = L.ClassConstants(self.log_prior, self.weights, self.temperature)
            loss = L.balanced_ce(logits, labels, consts, self.weighted_mean)  # Eq. 4-6 (Ren et al. when m = 0)
        return {f"{self.kind}_{key}": loss, "total": loss}


register_method("ce", "plain", partial(SingleHeadCriterion, "ce", "plain", kind="ce"))
register_method("focal", "plain", partial(SingleHeadCriterion, "focal", "plain", kind="focal"),
                {"focal_gamma": 1.0})  # gamma = 1 as in the focal baseline of Cao et al. (Lin et al. use 2)
register_method("bsce", "plain", partial(SingleHeadCriterion, "bsce", "plain", kind="bsce"),
                {"m": 0.0, "weighted_mean": "weights"})  # Ren et al.: logit adjustment only, no Eq. 7 weights
register_method("bsce-mlp", "mlp", partial(SingleHeadCriterion, "bsce-mlp", "mlp", kind="bsce", key="z"),
                {"m": 0.0, "weighted_mean": "weights"})  # Appendix C: branch z alone trained with BSCE
