"""Typed run configuration with the paper's presets (Section 4.2); every field can be overridden by dotted key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from mbib.errors import ConfigError


@dataclass
class DataConfig:
    # cifar100-lt, cifar10-lt, mnist-lt, digits-lt, npz:PATH, imagefolder:PATH, imagenet-lt, inat2018
    dataset: str = "cifar100-lt"
    data_root: str | None = None  # None -> $MBIB_DATA_ROOT
    imbalance_factor: float | None = 100.0  # None: the training set as stored (image folders' default)
    image_size: int | None = None  # image folders: resize to this (None: the model's input size, 32 for resnet32)
    augment: str = "standard"  # "standard" (crop+flip, the paper's) or "strong" (AutoAugment+Cutout, GML's)
    # a dose given to every train and test image once, when the set is built (mbib.data.recompress): "none", "q50"
    # (one more Pillow JPEG round, quality 50, 4:2:0) or "chroma" (Cb/Cr down by 2 and back up, Y untouched)
    recompress: str = "none"
    limit_train: int | None = None  # keep only the first N long-tailed training images (smoke runs, tests)
    limit_test: int | None = None
    loader_workers: int = 8  # DataLoader processes for image-file data sets (ImageNet-LT, iNaturalist)
    # share of each class's test images that chooses the best epoch (and a study's best trial); the rest report
    # (mbib.data.split). 0: the whole test set chooses and reports, as the paper did; studies default to 0.5
    selection_split: float = 0.0
    selection_seed: int = 0  # fixes which test images select


@dataclass
class ModelConfig:
    arch: str = "resnet32"
    num_taps: int = 3
    z_dim: int | None = None  # None -> the architecture's default (see mbib.models)
    input_tap: bool = False  # Table 4's 4-MBIB(x): the input image's GAP as the shallowest observation (mbib head)
    # "none" (the paper's figure), "bn" or "bn-post": a BatchNorm1d on each observation and inside z, which
    # Table 6's 486.02k parameters imply (mbib.models.tapped_net); an investigation switch
    neck: str = "none"


@dataclass
class LossConfig:
    """The method and its loss settings. A setting left None is the method's own paper default, registered beside
    its loss (mbib.methods; e.g. m = 0.1 for BIB / MBIB, 0 for BSCE): one config drives every method, and a
    value set here reaches every method that takes it."""

    method: str = "mbib"
    beta: float | None = None  # Eq. 9 / 12, weight of the VSD loss (Appendix J: 5)
    a: float | None = None  # Eq. 11, weight of BIB(v1, z) (Sec. 4.2: 0.1)
    b: float | None = None  # Eq. 11, weight of BIB(v2, z) (Sec. 4.2: 0.3)
    m: float | None = None  # Eq. 7 exponent (Sec. 4.2: 0.1; BSCE: 0)
    gamma: float | None = None  # VSD temperature exponent, T_i = (n_max / n_i)^gamma (CIFAR: 0)
    weighted_mean: str | None = None  # BSC batch mean: "weights" (Appendix J) or "batch" (Eq. 5-7 read literally)
    vsd_logits: str | None = None  # VSD on the "raw" head logits (Appendix J) or the "adjusted" f + log n, g + log n
    logit_adjust: bool | None = None  # BIB family: add log n_i to the logits (Eq. 4); false = Table 9's "w/o LA"
    # MBIB: detach the shallow teachers v_1..v_{n-1} in VSD (true, Appendix J's rule for BIB applied to every
    # tap) or let VSD's gradient reach them too, so shallow layers also learn from z (false; Sec. 3.3's reading)
    detach_shallow: bool | None = None
    focal_gamma: float | None = None  # focal loss exponent (Cao et al.'s baseline: 1)
    tau: float | None = None  # la: logit adjustment strength (Menon et al.: 1)
    gml_weight: float | None = None  # GML methods: weight of the contrastive term (con + con_T); the authors use 1
    drw_epoch: int = 160  # LDAM-DRW: epoch at which deferred re-weighting starts (the schedule's first lr drop)
    # beta ramps linearly from 0 over this many epochs (None: the lr warm-up's length; 0: Appendix J exactly).
    # Not in the paper: without it a VSD teacher that is still random collapses z on short schedules.
    vsd_warmup_epochs: float | None = None
    gml_views: int = 3  # GML methods: 3 augmented views (classifier, query, key) as published, or 1 shared view


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 128  # global batch, split across workers
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False  # Sec. 4.2 says SGD with momentum 0.9; Nesterov is an investigation switch
    weight_decay: float = 3e-4
    warmup_epochs: float = 5.0
    schedule: str = "step"  # "step" (Cao et al.) or "cosine" (to 0)
    milestones: tuple[int, ...] = (160, 180)
    milestone_factors: tuple[float, ...] = (0.01, 0.0001)  # lr x0.01 at 160 and x0.0001 at 180
    head_weight_decay: float | None = None  # the classifier heads' weight decay (None: weight_decay, as the paper)


@dataclass
class RuntimeConfig:
    num_workers: int = 1
    use_gpu: bool | None = None  # None -> use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: CPU workers share all the cluster's CPUs, GPU workers take 1
    gpus_per_worker: float = 1.0
    amp: bool = True  # bf16/fp16 autocast on CUDA; bf16 on CPUs with native bf16 (AMX, AVX512-BF16)
    channels_last: bool = True  # NHWC activations (CUDA and CPU)
    compile: bool | None = None  # torch.compile the training step; None: when the run has >= 5,000 steps
    # the device-resident, host-sync-free step (CUDA graphs on CUDA); None: on CUDA where the run allows it
    fast_step: bool | None = None
    eval_every: int = 5  # evaluate (and checkpoint) every N epochs and at the end
    max_failures: int = 0
    storage_path: str | None = None  # None -> ./mbib_runs
    # a checkpoint.pt to continue from when the run has none of its own (a run moved to another machine)
    resume_from: str | None = None
    seed: int = 0
    show_progress: bool = True
    inject_failure_epoch: int | None = None  # test hook: crash once after this epoch's checkpoint
    inject_nan_step: int | None = None  # test hook: make the loss NaN at this global step
    # test hook DIR:N: at its first checkpoint each process notes itself in DIR; the N-th waits there to be killed
    inject_hang: str | None = None


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    experiment: str = "mbib"
    run_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        cfg = cls()
        return apply_overrides(cfg, flatten(d))

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a CLI string (or JSON value) to the field's declared type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(v, args[0], key) for v in items if v != "")
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {value!r} for {key}: expected {getattr(annotation, '__name__', annotation)}") from None
    return value


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of cfg with dotted keys ("optim.lr", "loss.beta", "experiment") replaced, type-checked."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                                      for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))})
    for key, value in overrides.items():
        obj: Any = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
                raise ConfigError(f"unknown setting {key!r}: see `mbib train --help` for the settings")
            obj = getattr(obj, part)
        hints = typing.get_type_hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
        if parts[-1] not in hints:
            raise ConfigError(f"unknown setting {key!r}: see `mbib train --help` for the settings")
        if dataclasses.is_dataclass(hints[parts[-1]]):  # a whole section, e.g. `--set data=x`
            raise ConfigError(f"{key!r} is a section, not a setting: set one of its fields, e.g. {key}.{dataclasses.fields(hints[parts[-1]])[0].name}=...")
        setattr(obj, parts[-1], _coerce(value, hints[parts[-1]], key))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for key, value in cfg.flat().items():  # NaN slips through every range check (all comparisons are False)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={v} is not a finite number: give a finite value")
    from mbib.data.recompress import check_recompress  # here: the data package imports torch

    check_recompress(cfg.data.recompress)
    o, loss, rt = cfg.optim, cfg.loss, cfg.runtime
    checks = [
        (o.epochs >= 1, "optim.epochs must be >= 1"),
        (o.batch_size >= 1, "optim.batch_size must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.schedule in ("step", "cosine"), "optim.schedule must be 'step' or 'cosine'"),
        (len(o.milestones) == len(o.milestone_factors), "optim.milestones and optim.milestone_factors need equal lengths"),
        (o.head_weight_decay is None or o.head_weight_decay >= 0, "optim.head_weight_decay must be >= 0"),
        (all(v is None or v >= 0 for v in (loss.beta, loss.a, loss.b, loss.m, loss.gamma, loss.focal_gamma, loss.tau)),
         "loss.beta, a, b, m, gamma, focal_gamma and tau must be >= 0"),
        (rt.num_workers >= 1, "runtime.num_workers must be >= 1"),
        (rt.eval_every >= 1, "runtime.eval_every must be >= 1"),
        (cfg.data.imbalance_factor is None or cfg.data.imbalance_factor >= 1,
         "data.imbalance_factor must be >= 1 (or none: the training set as stored)"),
        (cfg.data.image_size is None or cfg.data.image_size >= 8, "data.image_size must be >= 8"),
        (cfg.data.augment in ("standard", "strong"), "data.augment must be 'standard' or 'strong'"),
        (0 <= cfg.data.selection_split < 1, "data.selection_split must be in [0, 1): the share of the test set that "
         "selects (0.5: half; 0: none held out)"),
        (cfg.model.neck in ("none", "bn", "bn-post"), "model.neck must be 'none', 'bn' or 'bn-post'"),
        (not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _cifar100_lt() -> TrainConfig:
    return TrainConfig()  # the dataclass defaults (and each method's registered ones) are Section 4.2's CIFAR-100-LT settings


def _imagenet_lt(arch: str, lr: float, batch: int) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(dataset="imagenet-lt", imbalance_factor=1.0),
        model=ModelConfig(arch=arch),
        loss=LossConfig(gamma=0.5, drw_epoch=72),
        optim=OptimConfig(epochs=90, batch_size=batch, lr=lr, weight_decay=5e-4, warmup_epochs=0.0,
                          schedule="cosine", milestones=(), milestone_factors=()),
        runtime=RuntimeConfig(eval_every=10),
    )


def _inat2018(epochs: int) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(dataset="inat2018", imbalance_factor=1.0),
        model=ModelConfig(arch="resnet50"),
        loss=LossConfig(gamma=0.5, drw_epoch=int(epochs * 0.8)),
        optim=OptimConfig(epochs=epochs, batch_size=64, lr=0.025, weight_decay=1e-4, warmup_epochs=0.0,
                          schedule="cosine", milestones=(), milestone_factors=()),
        runtime=RuntimeConfig(eval_every=10),
    )


PRESETS = {
    "cifar100-lt": _cifar100_lt,
    "imagenet-lt": lambda: _imagenet_lt("resnet10", 0.05, 128),
    "imagenet-lt-resnext50": lambda: _imagenet_lt("resnext50_32x4d", 0.025, 64),
    "inat2018": lambda: _inat2018(90),
    "inat2018-200ep": lambda: _inat2018(200),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """`--set KEY=VALUE` arguments as dotted overrides (typed later by apply_overrides)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}, e.g. --set optim.batch_size=64")
        out[key.strip()] = value.strip()
    return out


def scale_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """A shorter (or longer) run keeps the schedule's shape: warm-up, lr milestones and LDAM-DRW's re-weighting
    epoch (the first lr drop, 160 of 200) move in proportion to the epoch count."""
    o = cfg.optim
    ratio = epochs / o.epochs
    return dataclasses.replace(
        cfg,
        optim=dataclasses.replace(o, epochs=epochs, warmup_epochs=o.warmup_epochs * ratio,
                                  milestones=tuple(max(1, round(m * ratio)) for m in o.milestones)),
        loss=dataclasses.replace(cfg.loss, drw_epoch=max(1, round(cfg.loss.drw_epoch * ratio))),
    )


def resolve_config(preset_name: str, overrides: Mapping[str, Any] | None = None, *, epochs: int | None = None,
                   reshape: Mapping[str, Any] | None = None, pin_data_root: bool = False) -> TrainConfig:
    """The one way a run's settings are made (CLI, studies, reproduction): the preset, then `reshape` (settings
    that redefine the preset's schedule, e.g. the smoke study's), then `epochs` scaling that schedule, then
    `overrides` as given; an image folder is used as stored unless an imbalance factor is given; with
    `pin_data_root` the data root becomes absolute (Ray workers run in other directories)."""
    cfg = apply_overrides(preset(preset_name), dict(reshape or {}))
    if epochs is not None:
        cfg = scale_epochs(cfg, epochs)
    overrides = dict(overrides or {})
    if str(overrides.get("data.dataset", "")).lower().startswith("imagefolder:") and \
            "data.imbalance_factor" not in overrides:  # an image folder is a long-tailed set as it is
        overrides["data.imbalance_factor"] = None
    cfg = apply_overrides(cfg, overrides)
    if pin_data_root:
        from mbib.data.datasets import pinned_data_root

        cfg.data.data_root = pinned_data_root(cfg.data.data_root)
    return cfg
