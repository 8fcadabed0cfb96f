"""The run's per-step schedules as device tensors, indexed by a device step counter.

A captured step (mbib.train.fast_step) cannot take a Python float per step: the learning rate, the VSD weight
and the per-epoch class weights (LDAM's deferred re-weighting) are tabulated once, for every step of the run,
from what the per-step path follows (lr_factor, the task's VSD ramp, the criterion's own class-weight table),
and each step copies its row into the tensors the optimiser and the loss read.
"""

from __future__ import annotations

import torch

from mbib.config import OptimConfig
from mbib.train.schedule import lr_factor
from mbib.methods.task import Task


def lr_factors(optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> list[float]:
    """The base lr's multiplier at every step, as the engine's LambdaLR gives it (step s ends at (s+1)/spe)."""
    return [lr_factor((s + 1) / steps_per_epoch, optim) for s in range(total_steps)]


class DeviceSchedules:
    """Tables on the device and the 0-d tensors the optimiser and the loss read; `apply(step)` fills them."""

    def __init__(self, task: Task, optimizer: torch.optim.Optimizer, base_lrs: list[float], optim: OptimConfig,
                 steps_per_epoch: int, device: torch.device) -> None:
        total = steps_per_epoch * optim.epochs
        self.steps_per_epoch = steps_per_epoch
        factors = lr_factors(optim, steps_per_epoch, total)
        # float64, as LambdaLR multiplies; cast to the weights' float32 on the copy, as SGD casts a float lr
        self.lr = torch.tensor([[b * f for b in base_lrs] for f in factors], dtype=torch.float64, device=device)
        self.lr_now = [torch.tensor(b * factors[0], dtype=torch.float32, device=device) for b in base_lrs]
        beta = None if task.ramp is None else task.ramp.values(steps_per_epoch, total)
        self.beta = None if beta is None else torch.tensor(beta, dtype=torch.float64, device=device)
        if beta is not None:
            self.beta_now = torch.tensor(beta[0], dtype=torch.float32, device=device)
        weights = task.criterion.class_weight_table(optim.epochs)
        self.class_weights = None if weights is None else weights.detach().float().to(device)
        if weights is not None:
            self.weights_now = self.class_weights[0].clone()
        self.bind(task, optimizer)

    def bind(self, task: Task, optimizer: torch.optim.Optimizer) -> None:
        """Point the optimiser and the loss at the tensors `apply` fills (their Python values are replaced)."""
        for group, lr in zip(optimizer.param_groups, self.lr_now):
            group["lr"] = lr  # SGD (fused and single-tensor) takes a tensor lr and reads it where it lies
        if self.beta is not None:
            task.ramp.read_from(self.beta_now)  # the loss multiplies by it: Eq. 9's beta, read on the device
        if self.class_weights is not None:
            task.criterion.read_class_weights_from(self.weights_now)  # DRW's switch from the table, not the epoch

    def apply(self, step: torch.Tensor) -> None:
        """Fill the step's values from the tables; `step` is a 1-element long device tensor (no host sync)."""
        row = self.lr.index_select(0, step)[0]
        for g, lr in enumerate(self.lr_now):
            lr.copy_(row[g])
        if self.beta is not None:
            self.beta_now.copy_(self.beta.index_select(0, step)[0])
        if self.class_weights is not None:
            epoch = torch.div(step, self.steps_per_epoch, rounding_mode="floor")
            self.weights_now.copy_(self.class_weights.index_select(0, epoch)[0])
