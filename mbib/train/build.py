"""A run's configuration -> its method's Task: which network to build, with which loss settings.

Nothing here knows a method: the registry (mbib.losses) says each method's head, model options and task.
"""

from __future__ import annotations

from typing import Any

from mbib.config import TrainConfig
from mbib.errors import ConfigError
from mbib.losses import METHOD_MODEL_OPTIONS, METHODS, build_criterion, method_settings, method_task
from mbib.models import build_model
from mbib.train.task import Task


def model_spec(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """What build_model gets (checkpoints keep it as "model_spec" to rebuild the network)."""
    method = cfg.loss.method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(sorted(METHODS))}")
    options: dict[str, Any] = {"head": METHODS[method], "num_taps": cfg.model.num_taps, **METHOD_MODEL_OPTIONS.get(method, {})}
    if cfg.model.z_dim is not None:
        options["z_dim"] = cfg.model.z_dim
    if cfg.model.input_tap:
        options["input_tap"] = True
    if cfg.model.neck != "none":  # only when set, so checkpoints of the default net keep their spec
        options["neck"] = cfg.model.neck
    return {"name": cfg.model.arch, "num_classes": num_classes, "options": options}


# LossConfig field -> the criterion keyword it sets (the names the registry's defaults use)
LOSS_FIELDS = {"beta": "beta", "a": "a", "b": "b", "m": "m", "gamma": "gamma", "weighted_mean": "weighted_mean",
               "vsd_logits": "vsd_logits", "logit_adjust": "logit_adjust", "detach_shallow": "detach_shallow",
               "focal_gamma": "focal_gamma", "tau": "tau", "gml_weight": "con_weight",
               "drw_epoch": "drw_epoch"}


def criterion_hparams(cfg: TrainConfig) -> dict[str, Any]:
    """The loss settings the config sets (None fields stay the method's registered defaults)."""
    return {key: getattr(cfg.loss, name) for name, key in LOSS_FIELDS.items() if getattr(cfg.loss, name) is not None}


def loss_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Every loss setting by its config name, as the method's criterion gets it: the config's value, else the
    method's default; None where the method takes no such setting."""
    chosen = method_settings(cfg.loss.method, criterion_hparams(cfg))
    return {name: chosen.get(key) for name, key in LOSS_FIELDS.items()}


def build_task(cfg: TrainConfig, spec: dict[str, Any], class_counts) -> Task:
    """The method's task around a fresh network of `spec` (seed torch first for reproducible weights)."""
    network = build_model(spec["name"], spec["num_classes"], **spec["options"])
    criterion = build_criterion(cfg.loss.method, class_counts, **criterion_hparams(cfg))
    return method_task(cfg.loss.method)(cfg, network, criterion)
