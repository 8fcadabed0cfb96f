"""A run's configuration -> its method's Task: which network to build, with which loss settings.

Nothing here knows a method: the registry (mbib.methods) says each method's head, model options and task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mbib.config import LossConfig, TrainConfig
from mbib.errors import ConfigError
from mbib.methods import (METHOD_MODEL_OPTIONS, METHODS, Task, build_criterion, config_hparam, method_settings,
                          method_task)
from mbib.models import build_model


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


# LossConfig field -> the criterion keyword it sets, as the methods registered them
LOSS_FIELDS = {f.name: key for f in dataclasses.fields(LossConfig) if (key := config_hparam(f.name)) is not None}


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
