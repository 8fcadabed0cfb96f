"""Logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021), method "la".

Softmax cross entropy on logits shifted by tau * log(class prior): rare classes must win by a larger margin.
tau = 1 is Ren et al.'s balanced softmax ("bsce" without Eq. 7 weights); tau = 0 is plain cross entropy.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from mbib.losses import functional as L
from mbib.methods.criterion import Criterion
from mbib.methods.registry import register_method


def logit_adjusted_ce(logits: Tensor, labels: Tensor, log_prior: Tensor, tau: float) -> Tensor:
    # Menon et al. 2021, logit-adjusted loss: -log softmax(f(x) + tau * log pi)_y, averaged over the batch
    return F.cross_entropy(logits + tau * log_prior, labels)


class LogitAdjustedCriterion(Criterion):
    """The logit-adjusted loss on the final tap's logits."""

    def __init__(self, method: str, head: str, class_counts: Tensor, *, tau: float = 1.0) -> None:
        super().__init__(method, head, class_counts)
        self.tau = L.check_nonnegative("tau", tau)
        # log n_i rather than log pi_i: the constant log N cancels in the softmax
        self.register_buffer("log_prior", L.log_prior(class_counts).float(), persistent=False)

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        key = self.final_tap(outputs)
        loss = logit_adjusted_ce(self.logits(outputs, [key])[key], labels, self.log_prior, self.tau)
        return {f"la_{key}": loss, "total": loss}


register_method("la", "plain", partial(LogitAdjustedCriterion, "la", "plain"), {"tau": 1.0})  # tau = 1 as Menon et al.
