"""Model registry: `build_model(name, num_classes, **options) -> TappedNet`, `list_models()`, `ensemble_logits`.

Options (see ModelOptions): head ("mbib" | "bib" | "plain" | "mlp"), num_taps (2..6), z_dim (default: final
tap width), z_act (default "relu"), normed (LDAM cosine classifiers), input_tap (add Table 4's "x" tap),
neck ("none" | "bn" | "bn-post": the normalised neck of tapped_net's docstring).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from mbib.errors import ConfigError
from mbib.models.backbone import StagedBackbone, select_taps
from mbib.models.tapped_net import HEADS, NormedLinear, TappedNet, ensemble_logits, final_tap_key
from mbib.models.resnet_cifar import resnet32_backbone
from mbib.models.resnet_imagenet import imagenet_backbone

__all__ = [
    "HEADS",
    "ModelOptions",
    "NormedLinear",
    "StagedBackbone",
    "TappedNet",
    "build_model",
    "ensemble_logits",
    "final_tap_key",
    "input_size",
    "list_models",
    "select_taps",
]


@dataclass(frozen=True)
class ModelOptions:
    head: str = "mbib"
    num_taps: int = 3
    z_dim: int | None = None
    z_act: str = "relu"
    normed: bool = False
    input_tap: bool = False
    neck: str = "none"  # "bn" / "bn-post": BatchNorm1d on each observation and inside z (tapped_net docstring)


# name -> backbone factory(num_taps, input_tap)
_BACKBONES: dict[str, Callable[[int, bool], StagedBackbone]] = {
    "resnet32": lambda n, x: resnet32_backbone(n, x),
    "resnet10": lambda n, x: imagenet_backbone("resnet10", n, x),
    "resnet50": lambda n, x: imagenet_backbone("resnet50", n, x),
    "resnext50_32x4d": lambda n, x: imagenet_backbone("resnext50_32x4d", n, x),
}


# the input side length each backbone is trained at (CIFAR's 32 for ResNet-32, ImageNet's 224 otherwise)
INPUT_SIZES = {"resnet32": 32}


def input_size(name: str) -> int:
    return INPUT_SIZES.get(name, 224)


def list_models() -> list[str]:
    return list(_BACKBONES)


def build_model(name: str, num_classes: int, **options) -> TappedNet:
    """The TappedNet with backbone `name`; bad names or options raise a one-line ConfigError."""
    if name not in _BACKBONES:
        raise ConfigError(f"unknown model {name!r}; use one of {', '.join(list_models())}")
    valid = [f.name for f in fields(ModelOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown model option(s) {', '.join(unknown)}; valid options are {', '.join(valid)}")
    opts = ModelOptions(**options)
    backbone = _BACKBONES[name](opts.num_taps, opts.input_tap)
    return TappedNet(backbone, num_classes, opts.head, opts.z_dim, opts.z_act, opts.normed, opts.input_tap, opts.neck)
