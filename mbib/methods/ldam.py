"""LDAM with deferred re-weighting (Cao et al. 2019), method "ldam-drw": label-distribution-aware margins on the
cosine logits of a normed classifier, class-balanced weights from the defer epoch on."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor

from mbib.config import LossConfig
from mbib.errors import ConfigError
from mbib.losses import functional as L
from mbib.methods.criterion import Criterion
from mbib.methods.registry import register_method


class LDAMDRWCriterion(Criterion):
    """LDAM loss with deferred re-weighting (Cao et al. 2019) on cosine logits of a normed classifier."""

    def __init__(self, method: str, head: str, class_counts: Tensor, *, max_margin: float, scale: float,
                 drw_epoch: int, drw_beta: float) -> None:
        super().__init__(method, head, class_counts)
        if not (L.check_nonnegative("max_margin", max_margin) > 0 and L.check_nonnegative("scale", scale) > 0):
            raise ConfigError(f"max_margin={max_margin} and scale={scale} must both be > 0; fix the LDAM settings")
        if not 0.0 <= L.check_nonnegative("drw_beta", drw_beta) < 1.0:
            raise ConfigError(f"drw_beta={drw_beta} must be in [0, 1); Cao et al. use 0.9999")
        if isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0:
            raise ConfigError(f"drw_epoch={drw_epoch!r} must be an integer >= 0 (the epoch re-weighting starts)")
        self.scale = float(scale)
        self.drw_epoch = drw_epoch
        self.register_buffer("margins", L.ldam_margins(class_counts, max_margin).float(), persistent=False)
        self.register_buffer("drw_weights", L.drw_weights(class_counts, drw_beta).float(), persistent=False)
        self.fed_weights: Tensor | None = None  # a captured step's row of class_weight_table, when it feeds one

    def class_weights(self) -> Tensor | None:
        """Uniform before the defer epoch, class-balanced effective-number weights from it on."""
        if self.fed_weights is not None:
            return self.fed_weights
        return self.drw_weights if self.epoch >= self.drw_epoch else None

    def class_weight_table(self, epochs: int) -> Tensor:
        ones = torch.ones_like(self.drw_weights)  # uniform weights give the unweighted mean: the same loss as None
        return torch.stack([self.drw_weights if e >= self.drw_epoch else ones for e in range(epochs)])

    def read_class_weights_from(self, weights: Tensor) -> None:
        self.fed_weights = weights

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        key = self.final_tap(outputs)
        loss = L.ldam_loss(self.logits(outputs, [key])[key], labels, self.margins, self.scale, self.class_weights())
        return {f"ldam_{key}": loss, "total": loss}


register_method("ldam-drw", "plain", partial(LDAMDRWCriterion, "ldam-drw", "plain"),
                # Cao et al.: largest margin 0.5, cosine logits x 30, effective-number beta 0.9999 from the epoch the
                # config holds (160 of 200; presets and epoch scaling move it with the schedule)
                {"max_margin": 0.5, "scale": 30.0, "drw_epoch": LossConfig.drw_epoch, "drw_beta": 0.9999},
                {"normed": True})
