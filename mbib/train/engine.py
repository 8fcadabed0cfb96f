"""One worker's training state: the method's task, the data source, optimiser and schedule, with a train step
and an evaluation.

The engine knows no method and no kind of data: the task (mbib.methods.task) answers for the method, the data
source (mbib.data.source) for the data. It knows nothing of Ray either: the Ray Train loop (mbib.train.loop)
drives it, and benchmarks or tests can drive it directly. Distributed pieces (DDP, all-reduce of the confusion
matrix) switch on with world_size > 1.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from mbib import data as mdata
from mbib.config import TrainConfig
from mbib.data.filelist import FILE_LISTS
from mbib.data.source import Batch, Data, Shard, data_spec, open_source
from mbib.data.split import SELECT_METRIC, selection_mask, test_labels
from mbib.errors import ConfigError, TrainingError
from mbib.metrics import shot_groups
from mbib.models import ensemble_logits, input_size
from mbib.train.build import build_task, model_spec
from mbib.train.fast_step import FastStep, fast_step_blocker, use_fast_step
from mbib.train.schedule import lr_factor

IN_MEMORY_BYTES = 4 << 30  # image folders whose decoded images fit in this are held in memory as uint8 tensors
RESIDENT_EVAL_BATCH = 5000  # the fast path's CUDA evaluation: CIFAR's test set in two batches, not ten launch-bound ones


@dataclass(frozen=True)
class DeviceOptions:
    """What the device can use: mixed precision (its dtype), a GradScaler, the channels_last layout."""

    device: torch.device
    amp_dtype: torch.dtype | None
    grad_scaler: bool
    channels_last: bool
    # measured on 2 CPU cores: ResNet-32 inference is 2x faster at 128 than at 1,000 (activations stay in cache)
    eval_batch: int = 128


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix work runs natively (elsewhere bf16 autocast is emulated and slower)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch without the probes: stay in fp32
        return False


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU a measurement ran on, for result files: "Intel(R) Xeon(R) Processor, AVX512, native bf16"."""
    if cpuinfo is None:
        info = Path("/proc/cpuinfo")
        cpuinfo = info.read_text() if info.is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")
    return (f"{name or platform.processor() or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{'native bf16' if cpu_has_native_bf16() else 'no native bf16'}")


def device_options(device: torch.device, amp: bool, channels_last: bool, bf16_ok: bool | None = None) -> DeviceOptions:
    """Pure decision, so CPU tests can exercise every branch by passing the device type and bf16_ok.

    CUDA: bf16 autocast where supported (else fp16 with a GradScaler). CPU: bf16 autocast only where the CPU
    has native bf16; channels_last on both (oneDNN's convolutions are faster in NHWC on x86).
    """
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported() if bf16_ok is None else bf16_ok
        dtype = (torch.bfloat16 if bf16_ok else torch.float16) if amp else None
        return DeviceOptions(device, dtype, dtype is torch.float16, channels_last, eval_batch=1000)
    if device.type != "cpu":
        return DeviceOptions(device, None, False, False)
    bf16_ok = cpu_has_native_bf16() if bf16_ok is None else bf16_ok
    return DeviceOptions(device, torch.bfloat16 if amp and bf16_ok else None, False, channels_last)


def precision_label(opts: DeviceOptions) -> str:
    """The device a run trains on and in which precision, for its record: "cpu (AVX2), fp32",
    "cuda (NVIDIA H200), bfloat16". A run continued elsewhere may change both (see fit's legs)."""
    if opts.device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(opts.device)})"
    elif opts.device.type == "cpu":
        where = f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    else:
        where = opts.device.type
    return f"{where}, {'fp32' if opts.amp_dtype is None else str(opts.amp_dtype).removeprefix('torch.')}"


COMPILE_MIN_STEPS = 5000  # at the 7-10% torch.compile saved per step here (bench/train_throughput.py): minutes for seconds


def compiler_available(device: torch.device) -> bool:
    """torch.compile's inductor needs a C++ compiler for CPU code and Triton for CUDA code."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return shutil.which(get_cpp_compiler()) is not None
    except Exception:  # inductor raises its own error types when no compiler is found
        return False


def should_compile(setting: bool | None, total_steps: int, available: bool) -> bool:
    """runtime.compile: True compiles (refused in one line without a compiler), False never, None when the run
    is long enough to repay the compile time and a compiler is there."""
    if setting and not available:
        raise ConfigError("runtime.compile=true needs a C++ compiler (CPU) or Triton (CUDA): install one "
                          "(e.g. apt install g++) or set runtime.compile=false")
    return bool(setting) if setting is not None else available and total_steps >= COMPILE_MIN_STEPS


def load_data(cfg: TrainConfig) -> Data:
    if cfg.data.dataset in FILE_LISTS:
        check_undosed(cfg)
        return mdata.load_filelist_data(cfg.data.dataset, cfg.data.data_root)
    size = cfg.data.image_size or input_size(cfg.model.arch)
    if cfg.data.dataset.lower().startswith(mdata.IMAGEFOLDER):
        index = mdata.index_imagefolder(mdata.imagefolder_path(cfg.data.dataset))
        if len(index) * size * size * 3 > IN_MEMORY_BYTES:  # large sets stay files, decoded per batch
            check_undosed(cfg)
            return mdata.imagefolder_filelist_data(cfg.data.dataset, index)
    d = mdata.load_dataset(cfg.data.dataset, data_root=cfg.data.data_root, imbalance_factor=cfg.data.imbalance_factor,
                           seed=cfg.runtime.seed, image_size=size, recompress=cfg.data.recompress)
    return limit_data(d, cfg.data.limit_train, cfg.data.limit_test)


def check_undosed(cfg: TrainConfig) -> None:
    """A data set read from its files batch by batch takes no dose (one line): doses are given once to
    in-memory images (mbib.data.recompress), and these images are never all in memory."""
    if cfg.data.recompress != "none":
        raise ConfigError(f"data.recompress={cfg.data.recompress} needs an in-memory data set, but "
                          f"{cfg.data.dataset} is read from its files batch by batch: set data.recompress=none")


def limit_data(d: mdata.ImageData, limit_train: int | None, limit_test: int | None) -> mdata.ImageData:
    """Keep a fixed random subset of each split (smoke runs, tests); class counts follow the kept images."""
    if limit_train is None and limit_test is None:
        return d
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(d.y_train), generator=g)[: limit_train or len(d.y_train)]
    te = torch.randperm(len(d.y_test), generator=g)[: limit_test or len(d.y_test)]
    counts = torch.bincount(d.y_train[tr], minlength=len(d.classes)).clamp_min(1).tolist()
    return mdata.ImageData(x_train=d.x_train[tr], y_train=d.y_train[tr], x_test=d.x_test[te], y_test=d.y_test[te],
                           classes=d.classes, class_counts=counts, mean=d.mean, std=d.std, name=d.name,
                           recompress=d.recompress)


@dataclass
class EvalResult:
    acc: float
    many: float
    medium: float
    few: float
    head_acc: dict[str, float]
    confusion: torch.Tensor  # [K, K] counts, rows = true class
    split: dict[str, float] = field(default_factory=dict)  # select_acc, heldout_* (mbib.data.split)

    def metrics(self) -> dict[str, float]:
        out = {"acc": self.acc, "many": self.many, "medium": self.medium, "few": self.few, **self.split}
        out.update({f"acc_{k}": v for k, v in self.head_acc.items()})
        return out


@dataclass
class Engine:
    cfg: TrainConfig
    data: Data
    device: torch.device
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    steps_per_epoch: int = field(init=False)
    global_step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.opts = device_options(self.device, cfg.runtime.amp, cfg.runtime.channels_last)
        self.classes = list(self.data.classes)
        self.spec = model_spec(cfg, len(self.classes))
        torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every worker
        self.task = build_task(cfg, self.spec, self.data.class_counts).to(self.device, self.opts.channels_last)
        # the task's train_module as the step calls it: DDP-wrapped by wrap_model, maybe compiled below
        self.step_module = self.wrap_model(self.task.train_module)
        o = cfg.optim
        fast = use_fast_step(cfg.runtime.fast_step, self.device,
                             fast_step_blocker(cfg, self.data, self.task, self.world_size, self.opts))
        self.optimizer = torch.optim.SGD(self.task.param_groups(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov,
                                         fused=True if fast and self.device.type == "cuda" else None)
        shard = Shard(self.device, self.rank, self.world_size, self.opts.channels_last)
        self.source = open_source(self.data, shard, batch_size=self.local_batch, seed=cfg.runtime.seed,
                                  views=self.task.views, workers=cfg.data.loader_workers, augment=cfg.data.augment)
        self.steps_per_epoch = len(self.source)
        # which test images select (True) and which are held out to report, fixed by data.selection_seed
        self.selects = selection_mask(test_labels(self.data), cfg.data.selection_split,
                                      cfg.data.selection_seed).to(self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor((step + 1) / self.steps_per_epoch, o))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.opts.grad_scaler)
        total_steps = self.steps_per_epoch * o.epochs
        setting = cfg.runtime.compile
        if setting is None and fast and self.device.type == "cuda":
            setting = False  # graphs alone until bench/gpu_fast.sh shows compiled + captured pays (issue 23)
        self.compiled = setting is not False and should_compile(setting, total_steps, compiler_available(self.device))
        if self.compiled:  # the training forward only: evaluation and the saved weights stay the task's modules
            # static shapes: the epoch's last, smaller batch gets a graph of its own rather than slower dynamic ones
            self.step_module = torch.compile(self.step_module, dynamic=False)
            if self.device.type == "cpu":  # inductor's C++ build warns "No CUDA runtime is found" on CPU machines
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.fast = FastStep(self) if fast else None  # after the scheduler: it tabulates its learning rates

    @property
    def local_batch(self) -> int:
        return max(1, self.cfg.optim.batch_size // self.world_size)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.opts.amp_dtype, enabled=self.opts.amp_dtype is not None)

    def epoch_batches(self, epoch: int):
        """Augmented, normalised batches of this worker's shard (mbib.data.source.DataSource.epoch)."""
        return self.source.epoch(epoch)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step; returns the (detached) loss and its terms.

        A non-finite loss on any worker raises TrainingError on every worker at the same step (the flag is
        all-reduced), before the weights change.
        """
        task = self.task
        self.step_module.train()
        task.before_step(self.global_step, self.steps_per_epoch)
        with self._autocast():
            outputs = self.step_module(*task.inputs(batch))
        loss, terms = task.loss({k: v.float() for k, v in outputs.items()}, batch)
        if self.cfg.runtime.inject_nan_step is not None and self.global_step == self.cfg.runtime.inject_nan_step:
            loss = loss * float("nan")
        if not self.all_finite(loss):
            raise TrainingError(f"loss became NaN at step {self.global_step} (epoch {task.epoch}): "
                                "lower optim.lr or check the data; the run stopped there")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        task.sync_grads(self.world_size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        return loss.detach(), terms

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; returns images/s (all workers) and the mean loss terms. A NaN stops every worker."""
        t0 = time.perf_counter()
        sums, n, images = self.fast.run_epoch(epoch) if self.fast is not None else self.per_batch_epoch(epoch)
        seconds = max(1e-9, time.perf_counter() - t0)
        return {"images_per_s": images * self.world_size / seconds, **mean_terms(sums, n)}

    def per_batch_epoch(self, epoch: int) -> tuple[dict[str, float], int, int]:
        """An epoch of train_step calls: (summed loss terms, steps, images of this worker)."""
        self.task.start_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        n, images = 0, 0
        for batch in self.epoch_batches(epoch):
            _, terms = self.train_step(batch)  # checks finiteness itself: no second host sync here
            for k, v in terms.items():  # summed on the device: one transfer per epoch, not per step
                sums[k] = sums.get(k, 0.0) + v.float()
            n += 1
            images += len(batch.y)
        return {k: float(v) for k, v in sums.items()}, n, images

    def param_checksum(self) -> float:
        """Sum and sum of squares of all weights and loss state: equal on every DDP worker when they are in sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() + p.double().square().sum() for p in self.task.state_tensors()))

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Finite on every worker: a NaN anywhere must stop all of them at the same step."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    @torch.inference_mode()
    def evaluate(self, batch_size: int | None = None) -> EvalResult:
        """Balanced test set, sharded across workers; confusion matrices are summed so every worker agrees."""
        network = self.task.network  # what is exported and served, without training-only parts
        network.eval()
        k = len(self.classes)
        conf = torch.zeros(2, k, k, dtype=torch.float64, device=self.device)  # [held out, selects]
        head_correct: dict[str, torch.Tensor] = {}
        seen = 0
        large = self.fast is not None and self.device.type == "cuda"
        size = batch_size or (RESIDENT_EVAL_BATCH if large else self.opts.eval_batch)
        # the fast path runs one worker only, so its whole test set in order is the shard test_batches would give
        for x, y in self.fast.data.test_batches(size) if self.fast is not None else self.source.test_batches(size):
            with self._autocast():
                outputs = {h: v.float() for h, v in network(x).items()}
            pred = ensemble_logits(outputs).argmax(1)
            # the shard holds every world_size-th test image from `rank` (test_batches), in order
            part = self.selects[self.rank + self.world_size * torch.arange(seen, seen + len(y), device=self.device)]
            seen += len(y)
            conf += torch.bincount(part.long() * k * k + y * k + pred, minlength=2 * k * k).view(2, k, k).double()
            for h, v in outputs.items():
                head_correct[h] = head_correct.get(h, torch.zeros((), dtype=torch.float64, device=self.device)) \
                    + (v.argmax(1) == y).sum()
        heads = sorted(head_correct)
        correct = torch.stack([head_correct[h] for h in heads]) if heads else torch.zeros(0, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(conf)
            dist.all_reduce(correct)
        held, selecting = conf.cpu().unbind(0)
        conf = held + selecting
        total = max(1.0, conf.sum().item())
        shots = shot_accuracy_from_confusion(conf, self.data.class_counts)
        split = {SELECT_METRIC: shot_accuracy_from_confusion(selecting, self.data.class_counts)["overall"]}
        if held.sum() > 0:  # data.selection_split > 0: the held-out part's numbers, which nothing chose by
            held_shots = shot_accuracy_from_confusion(held, self.data.class_counts)
            split.update({f"heldout_{g}": v for g, v in held_shots.items() if g != "overall"}, heldout_acc=held_shots["overall"])
        return EvalResult(acc=shots["overall"], many=shots["many"], medium=shots["medium"], few=shots["few"],
                          head_acc={h: 100.0 * c / total for h, c in zip(heads, correct.cpu().tolist())},
                          confusion=conf.round().to(torch.int64), split=split)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.task.state_dict(),  # "model" (what export and serving rebuild), "train_module", "criterion"
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
            "torch_rng": torch.get_rng_state(),
            "model_spec": self.spec,
            "data_spec": data_spec(self.data),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        torch.set_rng_state(state["torch_rng"])
        if self.fast is not None:
            self.fast.reset()  # the loaded optimiser state lives at new addresses


def shot_accuracy_from_confusion(conf: torch.Tensor, class_counts) -> dict[str, float]:
    """Overall accuracy and the many/medium/few means of per-class accuracy, from summed confusion counts."""
    rows = conf.sum(1)
    per_class = conf.diag() / rows.clamp_min(1) * 100
    present = rows > 0
    out = {"overall": 100.0 * conf.diag().sum().item() / max(1.0, conf.sum().item())}
    for group, mask in shot_groups(class_counts).items():
        sel = per_class[mask & present]
        out[group] = sel.mean().item() if len(sel) else float("nan")
    return out


def mean_terms(sums: dict[str, float], n: int) -> dict[str, float]:
    return {f"train_{k}": v / max(1, n) for k, v in sums.items() if math.isfinite(v)}
