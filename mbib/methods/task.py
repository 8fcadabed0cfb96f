"""A method as the engine trains it: a Task owns the network, the module that trains it, the criterion and the
method's state, and answers each question the engine would otherwise answer with an `if method == ...`.

As in timm's TrainingTask (timm/task/), the loop only steps a task. A method that needs more than Task gives
(GML's key encoder, extra views and dataset indices) subclasses it beside its own code, and registers the
subclass with its loss (mbib.methods.register_method(..., task=...)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from mbib.config import TrainConfig
    from mbib.data.source import Batch
    from mbib.methods.criterion import Criterion


class Task:
    """Plain classification: the network trains as it is, and its criterion reads its logits and the labels."""

    views = 1  # augmented draws of each training image per batch (Batch.x, then Batch.views)
    capturable = True  # its state is the weights and the schedules, so one CUDA graph can hold its step
    ramp: VSDRamp | None = None  # the per-step VSD weight of methods with Eq. 9's distillation term

    def __init__(self, cfg: TrainConfig, network: nn.Module, criterion: Criterion) -> None:
        self.network = network  # the classifier that is evaluated, exported and served: checkpoint key "model"
        self.train_module = self.wrap(network)  # the network plus any training-only parts: key "train_module"
        self.criterion = criterion
        self.head_weight_decay = cfg.optim.head_weight_decay

    def wrap(self, network: nn.Module) -> nn.Module:
        """The module the optimiser trains; a method with training-only parts wraps the network here."""
        return network

    def to(self, device: torch.device, channels_last: bool = False) -> Task:
        self.train_module.to(device)
        if channels_last:
            self.train_module.to(memory_format=torch.channels_last)
        self.criterion.to(device)
        return self

    @property
    def epoch(self) -> int:
        return self.criterion.epoch

    def start_epoch(self, epoch: int) -> None:
        """Per-epoch schedules, at the start of every (0-based) epoch: the criterion's own (LDAM's DRW)."""
        self.criterion.set_epoch(epoch)

    def before_step(self, step: int, steps_per_epoch: int) -> None:
        """Per-step schedules, before the forward pass of global step `step` (BIB's VSD ramp)."""
        if self.ramp is not None:
            self.ramp.at(step, steps_per_epoch)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """What the training module is called with."""
        return (batch.x,)

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached terms) of the training module's float32 outputs."""
        return self.criterion(outputs, batch.y)

    def param_groups(self) -> list[dict[str, Any]]:
        """The trained weights and the loss's learnable parameters; those the criterion names undecayed, the
        network's classifier heads at optim.head_weight_decay when set."""
        params = list(self.train_module.parameters()) + [p for p in self.criterion.parameters() if p.requires_grad]
        no_decay = {id(p) for p in self.criterion.no_weight_decay_params()}
        heads = getattr(self.network, "heads", None)
        own = heads is not None and self.head_weight_decay is not None
        own_decay = {id(p) for p in heads.parameters()} if own else set()
        special = no_decay | own_decay
        groups = [{"params": [p for p in params if id(p) not in special]},
                  {"params": [p for p in params if id(p) in own_decay], "weight_decay": self.head_weight_decay},
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def sync_grads(self, world_size: int) -> None:
        """Average the gradients of the loss's own parameters (GML's temperatures): DDP covers the model only."""
        if world_size == 1:
            return
        for p in self.criterion.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every trained weight and float loss state: the DDP in-sync checksum sums them."""
        return [*self.train_module.parameters(), *self.criterion.parameters(),
                *(b for b in self.criterion.buffers() if b.is_floating_point())]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.network.state_dict(),  # what export and serving rebuild with build_model
            "train_module": self.train_module.state_dict(),  # plus any training-only parts (GML's key encoder)
            "criterion": self.criterion.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_module.load_state_dict(state["train_module"])
        self.criterion.load_state_dict(state["criterion"])


def vsd_warmup_epochs(cfg: TrainConfig) -> float:
    """loss.vsd_warmup_epochs, by default the learning rate's warm-up."""
    ramp_epochs = cfg.loss.vsd_warmup_epochs
    return cfg.optim.warmup_epochs if ramp_epochs is None else ramp_epochs


def ramp(step: float, total: float) -> float:
    """Linear warm-up factor: step / total, capped at 1 (the VSD weight's ramp over its warm-up steps)."""
    return min(1.0, step / total)


class VSDRamp:
    """The one deviation from Appendix J (docs/training.md): beta grows linearly from 0 over the warm-up epochs, so the
    distillation teacher q(y|v) is trained before z follows it; 0 warm-up epochs keeps beta fixed."""

    def __init__(self, loss: nn.Module, warmup_epochs: float) -> None:
        self.loss, self.beta, self.warmup_epochs = loss, loss.beta, warmup_epochs

    def value(self, step: int, steps_per_epoch: int) -> float:
        """beta at global step `step`."""
        if self.warmup_epochs > 0:
            return self.beta * ramp(step, self.warmup_epochs * steps_per_epoch)
        return self.beta

    def values(self, steps_per_epoch: int, total_steps: int) -> list[float]:
        """beta at every step of a run, for a captured step's table."""
        return [float(self.value(s, steps_per_epoch)) for s in range(total_steps)]

    def at(self, step: int, steps_per_epoch: int) -> None:
        if self.warmup_epochs > 0:
            self.loss.beta = self.value(step, steps_per_epoch)

    def read_from(self, beta: torch.Tensor) -> None:
        """Make the loss multiply by this 0-d device tensor (a captured step refills it) instead of a float."""
        self.loss.beta = beta
