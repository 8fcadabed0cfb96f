"""One worker's training state: model, criterion, optimiser and schedule, with a train step and an evaluation.

The engine knows nothing of Ray: the Ray Train loop (mbib.train.loop) drives it, and benchmarks or tests can
drive it directly. Distributed pieces (DDP, all-reduce of the confusion matrix) switch on with world_size > 1.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mbib import data as mdata
from mbib.config import TrainConfig
from mbib.data.filelist import FILE_LISTS, IMAGENET_MEAN, IMAGENET_STD
from mbib.errors import ConfigError, TrainingError
from mbib.losses import METHOD_MODEL_OPTIONS, METHODS, build_criterion
from mbib.metrics import shot_groups
from mbib.models import build_model, ensemble_logits, input_size
from mbib.gml import GML_METHODS, INDEX_KEY, GMLHead, register_gml_methods
from mbib.train.schedule import lr_factor

register_gml_methods()  # "gml" and "mbib-gml" train through the same engine
IN_MEMORY_BYTES = 4 << 30  # image folders whose decoded images fit in this are held in memory as uint8 tensors


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


COMPILE_MIN_STEPS = 5000  # at the ~10% torch.compile saves per step (bench/train_throughput.py), ~40x its compile time


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


def model_spec(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    method = cfg.loss.method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(sorted(METHODS))}")
    options: dict[str, Any] = {"head": METHODS[method], "num_taps": cfg.model.num_taps, **METHOD_MODEL_OPTIONS.get(method, {})}
    if cfg.model.z_dim is not None:
        options["z_dim"] = cfg.model.z_dim
    if cfg.model.input_tap:
        options["input_tap"] = True
    return {"name": cfg.model.arch, "num_classes": num_classes, "options": options}


Data = mdata.ImageData | mdata.FileListData  # in-memory tensors (CIFAR, MNIST, npz) or image files (ImageNet-LT)


class Batch(NamedTuple):
    """One training batch on the device: normalised, augmented images and what the losses need besides."""

    x: torch.Tensor  # [B, 3, H, W], the view the classifier heads see
    y: torch.Tensor  # [B] labels
    index: torch.Tensor  # [B] dataset indices (GML leaves a query's own keys out of its temperature term)
    views: tuple[torch.Tensor, ...] = ()  # further views of the same images (GML: query, key)


def class_names(d: Data) -> list[str]:
    if isinstance(d, mdata.ImageData):
        return list(d.classes)
    return list(d.class_names) if d.class_names else [str(i) for i in range(d.num_classes)]


def data_spec(d: Data) -> dict[str, Any]:
    if isinstance(d, mdata.ImageData):
        mean, std, size = d.mean, d.std, int(d.x_test.shape[-1])
    else:
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    return {"dataset": d.name, "classes": class_names(d), "mean": list(mean), "std": list(std),
            "image_size": size, "class_counts": list(map(int, d.class_counts))}


def criterion_hparams(cfg: TrainConfig) -> dict[str, Any]:
    loss = cfg.loss
    return {"beta": loss.beta, "a": loss.a, "b": loss.b, "m": loss.m, "gamma": loss.gamma, "drw_epoch": loss.drw_epoch,
            "con_weight": loss.gml_weight}


def load_data(cfg: TrainConfig) -> Data:
    if cfg.data.dataset in FILE_LISTS:
        return mdata.load_filelist_data(cfg.data.dataset, cfg.data.data_root)
    size = cfg.data.image_size or input_size(cfg.model.arch)
    if cfg.data.dataset.lower().startswith(mdata.IMAGEFOLDER):
        index = mdata.index_imagefolder(mdata.imagefolder_path(cfg.data.dataset))
        if len(index) * size * size * 3 > IN_MEMORY_BYTES:  # large sets stay files, decoded per batch
            return mdata.imagefolder_filelist_data(cfg.data.dataset, index)
    d = mdata.load_dataset(cfg.data.dataset, data_root=cfg.data.data_root, imbalance_factor=cfg.data.imbalance_factor,
                           seed=cfg.runtime.seed, image_size=size)
    return limit_data(d, cfg.data.limit_train, cfg.data.limit_test)


def limit_data(d: mdata.ImageData, limit_train: int | None, limit_test: int | None) -> mdata.ImageData:
    """Keep a fixed random subset of each split (smoke runs, tests); class counts follow the kept images."""
    if limit_train is None and limit_test is None:
        return d
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(d.y_train), generator=g)[: limit_train or len(d.y_train)]
    te = torch.randperm(len(d.y_test), generator=g)[: limit_test or len(d.y_test)]
    counts = torch.bincount(d.y_train[tr], minlength=len(d.classes)).clamp_min(1).tolist()
    return mdata.ImageData(x_train=d.x_train[tr], y_train=d.y_train[tr], x_test=d.x_test[te], y_test=d.y_test[te],
                           classes=d.classes, class_counts=counts, mean=d.mean, std=d.std, name=d.name)


@dataclass
class EvalResult:
    acc: float
    many: float
    medium: float
    few: float
    head_acc: dict[str, float]
    confusion: torch.Tensor  # [K, K] counts, rows = true class

    def metrics(self) -> dict[str, float]:
        out = {"acc": self.acc, "many": self.many, "medium": self.medium, "few": self.few}
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
    model: nn.Module = field(init=False)
    net: nn.Module = field(init=False)
    steps_per_epoch: int = field(init=False)
    global_step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.opts = device_options(self.device, cfg.runtime.amp, cfg.runtime.channels_last)
        self.classes = class_names(self.data)
        num_classes = len(self.classes)
        self.spec = model_spec(cfg, num_classes)
        torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every worker
        self.base = build_model(self.spec["name"], num_classes, **self.spec["options"])
        # GML adds a projection head and a momentum key encoder around the network it trains
        method = cfg.loss.method
        self.net = (GMLHead(self.base, feature=GML_METHODS[method][1]) if method in GML_METHODS
                    else self.base).to(self.device)
        if self.opts.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.criterion = build_criterion(cfg.loss.method, self.data.class_counts, **criterion_hparams(cfg))
        self.criterion = self.criterion.to(self.device)
        self.beta = getattr(self.criterion, "beta", None)  # the VSD weight the ramp scales (BIB family only)
        ramp = cfg.loss.vsd_warmup_epochs
        self.vsd_warmup = cfg.optim.warmup_epochs if ramp is None else ramp
        self.gml = method in GML_METHODS
        self.views = cfg.loss.gml_views if self.gml else 1
        if self.views not in (1, 3):
            raise ConfigError(f"loss.gml_views={self.views} is not supported: use 3 (as GML publishes) or 1")
        self.model = self.wrap_model(self.net)
        params = list(self.net.parameters()) + [p for p in self.criterion.parameters() if p.requires_grad]
        no_decay = {id(p) for p in getattr(self.criterion, "no_weight_decay_params", lambda: [])()}
        groups = [{"params": [p for p in params if id(p) not in no_decay]},
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        o = cfg.optim
        self.optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.in_memory = isinstance(self.data, mdata.ImageData)
        self.batches = self._train_batches()
        self.steps_per_epoch = len(self.batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor((step + 1) / self.steps_per_epoch, o))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.opts.grad_scaler)
        total_steps = self.steps_per_epoch * o.epochs
        setting = cfg.runtime.compile
        self.compiled = setting is not False and should_compile(setting, total_steps, compiler_available(self.device))
        if self.compiled:  # the training forward only: evaluation and the saved weights stay those of self.net
            # static shapes: the epoch's last, smaller batch gets a graph of its own rather than slower dynamic ones
            self.model = torch.compile(self.model, dynamic=False)
        from mbib.data.strong_augment import AUGMENTATIONS  # imported lazily: strong augmentation pulls in v2 transforms

        self.augment = AUGMENTATIONS[cfg.data.augment]

    def _train_batches(self):
        """(x, y, index) batches, DDP-sharded: uint8 images to augment on the device, or a DataLoader of
        decoded files (``self.views`` transformed draws of each)."""
        seed = self.cfg.runtime.seed
        if self.in_memory:
            return mdata.BatchIterator(self.data.x_train, self.data.y_train, batch_size=self.local_batch,
                                       shuffle=True, seed=seed, rank=self.rank, world_size=self.world_size,
                                       return_index=True)
        from torch.utils.data import DataLoader, DistributedSampler

        from mbib.data.filelist import IndexedViews

        train = IndexedViews(self.data.train, self.views)
        sampler = DistributedSampler(train, num_replicas=self.world_size, rank=self.rank, seed=seed)
        loader = DataLoader(train, batch_size=self.local_batch, sampler=sampler,
                            num_workers=self.cfg.data.loader_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=self.cfg.data.loader_workers > 0)
        loader.set_epoch = sampler.set_epoch
        return loader

    def _test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised test images of this worker's shard (every world_size-th image)."""
        if self.in_memory:
            idx = torch.arange(self.rank, len(self.data.y_test), self.world_size)
            for start in range(0, len(idx), batch_size):
                sel = idx[start:start + batch_size]
                x = mdata.normalize(self._to_device(self.data.x_test[sel]), self.data.mean, self.data.std)
                yield x, self.data.y_test[sel].to(self.device)
            return
        from torch.utils.data import DataLoader, Subset

        shard = Subset(self.data.test, range(self.rank, len(self.data.test), self.world_size))
        for x, y in DataLoader(shard, batch_size=batch_size, num_workers=self.cfg.data.loader_workers):
            yield self._to_device(x), y.to(self.device)

    @property
    def local_batch(self) -> int:
        return max(1, self.cfg.optim.batch_size // self.world_size)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.opts.channels_last else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.opts.amp_dtype, enabled=self.opts.amp_dtype is not None)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """Augmented, normalised batches of this worker's shard; seeded by (seed, epoch, rank) for exact resumes."""
        self.batches.set_epoch(epoch)
        gen = torch.Generator(device=self.device).manual_seed(
            self.cfg.runtime.seed * 1_000_003 + epoch * 1_009 + self.rank)
        for x, y, index in self.batches:
            x = self._to_device(x)
            if self.in_memory:  # each view is its own draw of the augmentation
                views = [self.augment(x, self.data.mean, self.data.std, generator=gen) for _ in range(self.views)]
            else:  # the DataLoader already drew the views: [B, V, 3, H, W] when V > 1
                views = [self._to_device(v) for v in x.unbind(1)] if self.views > 1 else [x]
            yield Batch(views[0], y.to(self.device, non_blocking=True), index.to(self.device), tuple(views[1:]))

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step; returns the (detached) loss and its terms.

        A non-finite loss on any worker raises TrainingError on every worker at the same step (the flag is
        all-reduced), before the weights change.
        """
        self.model.train()
        if self.beta is not None and self.vsd_warmup > 0:
            self.criterion.beta = self.beta * min(1.0, self.global_step / (self.vsd_warmup * self.steps_per_epoch))
        with self._autocast():
            outputs = self.model(batch.x, *batch.views)
        outputs = {k: v.float() for k, v in outputs.items()}
        if self.gml:
            outputs[INDEX_KEY] = batch.index
        loss, terms = self.criterion(outputs, batch.y)
        if self.cfg.runtime.inject_nan_step is not None and self.global_step == self.cfg.runtime.inject_nan_step:
            loss = loss * float("nan")
        if not self.all_finite(loss):
            raise TrainingError(f"loss became NaN at step {self.global_step} (epoch {self.criterion.epoch}): "
                                "lower optim.lr or check the data; the run stopped there")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.sync_criterion_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        after = getattr(self.criterion, "after_step", None)
        if after is not None:
            after(self.net)
        self.global_step += 1
        return loss.detach(), terms

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; returns images/s (all workers) and the mean loss terms. A NaN stops every worker."""
        self.criterion.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        n, images, t0 = 0, 0, time.perf_counter()
        for batch in self.epoch_batches(epoch):
            _, terms = self.train_step(batch)  # checks finiteness itself: no second host sync here
            for k, v in terms.items():  # summed on the device: one transfer per epoch, not per step
                sums[k] = sums.get(k, 0.0) + v.float()
            n += 1
            images += len(batch.y)
        seconds = max(1e-9, time.perf_counter() - t0)
        return {"images_per_s": images * self.world_size / seconds,
                **mean_terms({k: float(v) for k, v in sums.items()}, n)}

    def sync_criterion_grads(self) -> None:
        """Average the gradients of the loss's own parameters (GML's temperatures): DDP covers the model only."""
        if self.world_size == 1:
            return
        for p in self.criterion.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    def param_checksum(self) -> float:
        """Sum and sum of squares of all weights and loss state: equal on every DDP worker when they are in sync."""
        tensors = [*self.net.parameters(), *self.criterion.parameters(),
                   *(b for b in self.criterion.buffers() if b.is_floating_point())]
        with torch.no_grad():
            return float(sum(p.double().sum() + p.double().square().sum() for p in tensors))

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Finite on every worker: a NaN anywhere must stop all of them at the same step."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    @torch.inference_mode()
    def evaluate(self, batch_size: int | None = None) -> EvalResult:
        """Balanced test set, sharded across workers; confusion matrices are summed so every worker agrees."""
        self.net.eval()
        k = len(self.classes)
        conf = torch.zeros(k, k, dtype=torch.float64, device=self.device)
        head_correct: dict[str, torch.Tensor] = {}
        for x, y in self._test_batches(batch_size or self.opts.eval_batch):
            with self._autocast():
                outputs = {h: v.float() for h, v in self.net(x).items()}
            pred = ensemble_logits(outputs).argmax(1)
            conf += torch.bincount(y * k + pred, minlength=k * k).view(k, k).double()
            for h, v in outputs.items():
                head_correct[h] = head_correct.get(h, torch.zeros((), dtype=torch.float64, device=self.device)) \
                    + (v.argmax(1) == y).sum()
        heads = sorted(head_correct)
        correct = torch.stack([head_correct[h] for h in heads]) if heads else torch.zeros(0, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(conf)
            dist.all_reduce(correct)
        conf = conf.cpu()
        total = max(1.0, conf.sum().item())
        shots = shot_accuracy_from_confusion(conf, self.data.class_counts)
        return EvalResult(acc=shots["overall"], many=shots["many"], medium=shots["medium"], few=shots["few"],
                          head_acc={h: 100.0 * c / total for h, c in zip(heads, correct.cpu().tolist())},
                          confusion=conf.round().to(torch.int64))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.base.state_dict(),  # what export and serving rebuild with build_model
            "train_module": self.net.state_dict(),  # plus any training-only parts (GML key encoder)
            "criterion": self.criterion.state_dict(),
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
        self.net.load_state_dict(state["train_module"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        torch.set_rng_state(state["torch_rng"])


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
