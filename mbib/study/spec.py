"""What a study runs: the search space, its data sets and each trial's Train config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbib.config import TrainConfig, apply_overrides, resolve_config
from mbib.data.split import SELECT_METRIC
from mbib.train.build import loss_settings

SEARCH_SPACE: dict[str, tuple[float, float]] = {  # the paper's ranges (Sec. 4.2, Fig. 3-4)
    "beta": (0.0, 5.0), "a": (0.0, 1.0), "b": (0.0, 1.0), "m": (0.0, 0.5), "gamma": (0.0, 1.0)}
METRIC, BUDGET = SELECT_METRIC, "epochs_done"  # what ASHA, Optuna and the best trial compare; ASHA's clock
SELECTION_SPLIT = 0.5  # a study's default data.selection_split: half of each class's test images select


@dataclass
class DatasetSpec:
    key: str  # names the Tune experiment, the parent run and the registered model ("cifar100-lt-if100")
    overrides: dict[str, Any]  # dotted config keys on top of the study's preset


@dataclass
class StudySpec:
    name: str
    preset: str
    datasets: list[DatasetSpec]
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every data set
    epochs: int | None = None  # scales the preset's schedule (warm-up, milestones, DRW epoch) to this many epochs
    reshape: dict[str, Any] = field(default_factory=dict)  # redefines the preset's schedule before scaling (smoke)
    num_samples: int = 24
    max_concurrent: int = 8
    gpus_per_trial: float = 0.0  # 0.25 packs four CIFAR trials on one GPU
    grace_period: int | None = None  # ASHA's first rung in epochs; None -> epochs // 10
    reduction_factor: int = 3
    seed: int = 0
    selection_split: float = SELECTION_SPLIT  # data.selection_split of every trial (--set can still change it)
    storage_path: str | None = None  # Tune + Train results; s3://... on a cluster
    tracking_uri: str | None = None

    def base_config(self, ds: DatasetSpec) -> TrainConfig:
        cfg = resolve_config(self.preset, {"data.selection_split": self.selection_split, **self.overrides, **ds.overrides},
                             epochs=self.epochs, reshape=self.reshape,
                             pin_data_root=True)  # trials run in other working directories
        if self.gpus_per_trial > 0:  # a fraction of a GPU per Train worker lets small trials share one GPU
            cfg = apply_overrides(cfg, {"runtime.use_gpu": True,
                                        "runtime.gpus_per_worker": self.gpus_per_trial / cfg.runtime.num_workers})
        return cfg

    def root(self) -> str:
        base = self.storage_path or "mbib_runs"
        return f"{base.rstrip('/')}/{self.name}" if "://" in base else str(Path(base).resolve() / self.name)


def paper_point(cfg: TrainConfig) -> dict[str, float]:
    """The preset's (paper's) loss settings: beta=5, a=0.1, b=0.3, m=0.1, gamma=0 (CIFAR) / 0.5 (ImageNet, iNat)."""
    settings = loss_settings(cfg)
    return {k: float(settings[k]) for k in SEARCH_SPACE}


def trial_train_config(config: dict[str, Any]) -> TrainConfig:
    """The Train config of one trial: the data set's base config with the searched loss settings."""
    cfg = TrainConfig.from_dict(config["train"])
    return apply_overrides(cfg, {f"loss.{k}": config[k] for k in SEARCH_SPACE})

