"""The training step without the host: batches gathered from device-resident data, schedules read from device
tables, the NaN check a device flag read once an epoch; on CUDA each batch shape's step is one CUDA graph.

A step of a ResNet-32 on CIFAR is ~600 small kernels, so on a GPU its speed is the host's launch rate: the
per-batch path (Engine.train_step) copies each batch's indices, builds tensors and reads the loss back every
step. Here an epoch runs with no host synchronisation; a NaN is found at the epoch's end, the weights go back
to the epoch's start and the run stops with the step it happened at. The per-batch path stays for what cannot
be planned or captured: file-backed data, strong augmentation, GML's extra views and queue, several workers,
fp16 with a GradScaler (its inf check reads the host).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

import torch
from torch import nn

from mbib.config import TrainConfig
from mbib.data.datasets import ImageData
from mbib.errors import ConfigError, TrainingError
from mbib.train.tables import DeviceSchedules
from mbib.methods.task import Task


# eager steps of each batch shape before its capture: cuDNN's autotuning, lazy allocations and SGD's momentum
# buffers all happen outside the graph
WARMUP_STEPS = 3


def fast_step_blocker(cfg: TrainConfig, data, task: Task, world_size: int, opts: Any) -> str | None:
    """Why this run cannot take the fast step, or None when it can (`opts`: the engine's DeviceOptions;
    mbib.train.engine imports this module, so none of its names are imported back)."""
    if not isinstance(data, ImageData):
        return "needs an in-memory data set (file-backed sets are decoded per batch)"
    if cfg.data.augment != "standard" or task.views != 1:
        return "needs data.augment=standard and one view per image"
    if not task.capturable:
        return f"cannot capture the state of method {cfg.loss.method!r}"
    if world_size != 1:
        return "runs one worker per run"
    if opts.grad_scaler:
        return "cannot run fp16 with a GradScaler (its inf check reads the host every step)"
    return None


def use_fast_step(setting: bool | None, device: torch.device, blocker: str | None) -> bool:
    """runtime.fast_step: True asks for it (refused in one line when the run cannot), False never, None on CUDA
    when the run can (on the CPU the per-batch path is as fast: there is no launch latency to save)."""
    if setting and blocker:
        raise ConfigError(f"runtime.fast_step=true {blocker}: set runtime.fast_step=false")
    return bool(setting) if setting is not None else device.type == "cuda" and blocker is None


class StepOwner(Protocol):
    """What FastStep reads and advances of the Engine that owns it (typed here: the engine imports this module)."""

    cfg: TrainConfig
    device: torch.device
    source: Any  # the engine's in-memory data set (fast_step_blocker let only ImageData through)
    task: Task
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    opts: Any  # the engine's DeviceOptions: amp_dtype is read
    steps_per_epoch: int
    global_step: int


class FastStep:
    """Runs the engine's epochs on the fast path; the engine keeps the weights, optimiser and checkpoints."""

    def __init__(self, engine: StepOwner) -> None:
        from mbib.data.resident import ResidentData  # strong augmentation's imports stay off the CPU-only paths

        self.engine = engine
        device = engine.device
        self.data = ResidentData(engine.source)
        self.tables = DeviceSchedules(engine.task, engine.optimizer, engine.scheduler.base_lrs, engine.cfg.optim,
                                      engine.steps_per_epoch, device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # the global step, counted on the device
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the next batch's first image in the plan
        self.nan_step = torch.full((1,), -1, dtype=torch.long, device=device)  # first non-finite loss, -1: none
        self.inject = engine.cfg.runtime.inject_nan_step
        self.plan = None
        self.term_names: list[str] | None = None
        self.term_sum: torch.Tensor | None = None
        self.graphed = device.type == "cuda"  # a benchmark may turn it off to time the uncaptured step
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.calls: Counter[int] = Counter()
        self.ranges: dict[int, torch.Tensor] = {}
        if self.graphed:
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once, in the warm-up

    def reset(self) -> None:
        """Drop the captured graphs (their addresses die with a loaded optimiser state or a rollback)."""
        self.graphs.clear()
        self.calls.clear()

    def run_epoch(self, epoch: int) -> tuple[dict[str, float], int, int]:
        """Train one epoch: (summed loss terms, steps, images). A NaN rolls the epoch back and stops the run."""
        engine = self.engine
        snapshot = self.snapshot()
        first_step = engine.global_step
        self.begin(epoch)
        self.train_steps()
        # the epoch's one host read: the NaN flag and the loss terms' sums together
        values = torch.cat([self.nan_step.double(), self.term_sum.double()]).tolist()
        if values[0] >= 0:
            self.restore(snapshot)
            engine.global_step = first_step
            raise TrainingError(f"loss became NaN at step {int(values[0])} (epoch {epoch}): lower optim.lr or "
                                f"check the data; the weights are back at the start of epoch {epoch} and the run "
                                "stopped there")
        engine.scheduler.last_epoch = engine.global_step  # a checkpoint continued on the per-batch path agrees
        return dict(zip(self.term_names, values[1:])), len(self.plan.sizes), sum(self.plan.sizes)

    def begin(self, epoch: int) -> None:
        """Write the epoch's plan into the buffers the step reads and reset its counters (device work only)."""
        engine = self.engine
        engine.task.start_epoch(epoch)
        self.tables.bind(engine.task, engine.optimizer)  # again: a loaded state or train_step may have replaced them
        plan = self.data.plan(epoch)
        if self.plan is None:
            self.plan = plan
        else:
            self.plan.copy_(plan)
        self.step.fill_(engine.global_step)
        self.pos.zero_()
        self.nan_step.fill_(-1)
        if self.term_sum is not None:
            self.term_sum.zero_()

    def train_steps(self) -> None:
        """The epoch's steps, in order, with no host synchronisation."""
        for n in self.plan.sizes:
            self.run(n)
            self.engine.global_step += 1

    def run(self, n: int) -> None:
        """One step of batch size n: eager on the CPU; on CUDA eager for the warm-up, then captured and replayed."""
        if not self.graphed:
            return self.step_fn(n)
        graph = self.graphs.get(n)
        if graph is None:
            self.calls[n] += 1
            if self.calls[n] <= WARMUP_STEPS:
                side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture expects
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.step_fn(n)
                torch.cuda.current_stream().wait_stream(side)
                return None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step without running it
                self.step_fn(n)
            self.graphs[n] = graph
        graph.replay()
        return None

    def step_fn(self, n: int) -> None:
        """Gather, augment, forward, loss, backward, SGD: every input read from device tensors."""
        engine, task = self.engine, self.engine.task
        if n not in self.ranges:
            self.ranges[n] = torch.arange(n, device=engine.device)
        batch = self.data.gather(self.plan, self.pos + self.ranges[n])
        self.tables.apply(self.step)
        engine.step_module.train()
        # no autocast weight cache: a captured graph must cast the weights it is replayed with
        with torch.autocast(engine.device.type, dtype=engine.opts.amp_dtype, enabled=engine.opts.amp_dtype is not None,
                            cache_enabled=False):
            outputs = engine.step_module(*task.inputs(batch))
        loss, terms = task.loss({k: v.float() for k, v in outputs.items()}, batch)
        if self.inject is not None:  # runtime.inject_nan_step, compared on the device
            loss = loss * torch.where(self.step[0] == self.inject, float("nan"), 1.0)
        bad = ~torch.isfinite(loss.detach())
        self.nan_step.copy_(torch.where(bad & (self.nan_step < 0), self.step, self.nan_step))
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.optimizer.step()
        if self.term_names is None:  # the first (eager) step names the terms and sizes their sum
            self.term_names = list(terms)
            self.term_sum = torch.zeros(len(terms), device=engine.device)
        self.term_sum.add_(torch.stack([terms[k].float() for k in self.term_names]))
        self.pos.add_(n)
        self.step.add_(1)

    def state_tensors(self) -> list[torch.Tensor]:
        """What an epoch changes: weights, buffers (BN statistics), the loss's state and SGD's momentum."""
        engine = self.engine
        momentum = [s["momentum_buffer"] for s in engine.optimizer.state.values() if "momentum_buffer" in s]
        return [*engine.task.train_module.state_dict().values(), *engine.task.criterion.state_dict().values(),
                *momentum]

    def snapshot(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach().clone() for t in self.state_tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        """Copy the snapshot back in place; momentum made after it (a first epoch's) is dropped with the graphs."""
        current = self.state_tensors()
        if len(current) != len(snapshot):
            self.engine.optimizer.state.clear()
            current = self.state_tensors()
        with torch.no_grad():
            for now, then in zip(current, snapshot):
                now.copy_(then)
        self.reset()
