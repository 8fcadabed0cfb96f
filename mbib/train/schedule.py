"""Learning-rate schedules as pure functions of (fractional) epoch, stepped once per iteration."""

from __future__ import annotations

import math

from mbib.config import OptimConfig


def lr_factor(epoch: float, optim: OptimConfig) -> float:
    """Multiplier of the base lr for the step that ends at fractional `epoch` (Section 4.2; Cao et al. 2019).

    The caller passes (step + 1) / steps_per_epoch, so linear warm-up never yields a zero learning rate.
    """
    if epoch < optim.warmup_epochs:
        return epoch / optim.warmup_epochs
    if optim.schedule == "cosine":
        span = max(optim.epochs - optim.warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - optim.warmup_epochs) / span)))
    factor = 1.0
    for milestone, f in zip(optim.milestones, optim.milestone_factors):
        if epoch >= milestone:
            factor = f  # Cao et al.'s factors are absolute (x0.01, then x0.0001), not cumulative
    return factor

