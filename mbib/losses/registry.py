"""Method name -> model head, default hyperparameters and loss factory; build_criterion validates and builds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import Tensor

from mbib.errors import ConfigError
from mbib.losses import functional as L
from mbib.losses.criteria import BIBCriterion, Criterion, LDAMDRWCriterion, SingleHeadCriterion

HEADS = ("plain", "bib", "mbib", "mlp")

Factory = Callable[..., Criterion]


@dataclass(frozen=True)
class MethodSpec:
    head: str
    factory: Factory
    defaults: Mapping[str, Any]
    model_options: Mapping[str, Any] = field(default_factory=dict)


_SPECS: dict[str, MethodSpec] = {}
METHODS: dict[str, str] = {}  # method -> head it needs ("plain" / "bib" / "mbib" / "mlp")
METHOD_MODEL_OPTIONS: dict[str, dict[str, Any]] = {}  # method -> build_model options (head, normed)


def register_method(name: str, head: str, factory: Factory, defaults: Mapping[str, Any] | None = None,
                    model_options: Mapping[str, Any] | None = None) -> None:
    """Add a method: ``factory(class_counts: float64 Tensor [K], **hparams) -> Criterion`` receives the
    method's ``defaults`` overridden by the caller's values for those names; ``model_options`` are extra
    build_model options (besides head) the method's model needs."""
    if head not in HEADS:
        raise ConfigError(f"head {head!r} of method {name!r} is unknown; use one of {', '.join(HEADS)}")
    if name in _SPECS and _SPECS[name].factory is not factory:
        raise ConfigError(f"loss method {name!r} is already registered; pick another name")
    _SPECS[name] = MethodSpec(head, factory, dict(defaults or {}), dict(model_options or {}))
    METHODS[name] = head
    METHOD_MODEL_OPTIONS[name] = {"head": head, **(model_options or {})}


def method_defaults(method: str) -> dict[str, Any]:
    """The hyperparameters ``method`` takes, with their defaults."""
    return dict(_spec(method).defaults)


def _spec(method: str) -> MethodSpec:
    if method not in _SPECS:
        raise ConfigError(f"unknown loss method {method!r}; use one of {', '.join(sorted(_SPECS))}")
    return _SPECS[method]


def build_criterion(method: str, class_counts: Any, **hparams: Any) -> Criterion:
    """The loss module of ``method``. Names no registered method takes raise ConfigError (typos); names
    other methods take but this one does not are ignored, so one config can drive every method."""
    spec = _spec(method)
    known = {name for s in _SPECS.values() for name in s.defaults}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ConfigError(f"unknown loss hyperparameter(s) {unknown}; known: {', '.join(sorted(known))}")
    for name in ("logit_adjust",):
        if name in hparams and not isinstance(hparams[name], bool):
            raise ConfigError(f"loss option {name}={hparams[name]!r} must be true or false")
    chosen = {**spec.defaults, **{k: v for k, v in hparams.items() if k in spec.defaults}}
    return spec.factory(L.as_class_counts(class_counts), **chosen)


def _bib_family(method: str, head: str, wiring: str, fixed: Mapping[str, Any]) -> Factory:
    def factory(class_counts: Tensor, **hparams: Any) -> Criterion:
        return BIBCriterion(method, head, class_counts, wiring=wiring, **{**fixed, **hparams})
    return factory


_BIB = {"beta": L.DEFAULT_BETA, "m": 0.1, "gamma": 0.0, "weighted_mean": "weights", "logit_adjust": True}
_MBIB = {**_BIB, "a": 0.1, "b": 0.3}  # Sec. 4.2: a = 0.1, b = 0.3, m = 0.1 on all datasets

register_method("ce", "plain", partial(SingleHeadCriterion, "ce", "plain", kind="ce"))
register_method("focal", "plain", partial(SingleHeadCriterion, "focal", "plain", kind="focal"),
                {"focal_gamma": 1.0})  # gamma = 1 as in the focal baseline of Cao et al. (Lin et al. use 2)
register_method("bsce", "plain", partial(SingleHeadCriterion, "bsce", "plain", kind="bsce"),
                {"m": 0.0, "weighted_mean": "weights"})  # Ren et al.: logit adjustment only, no Eq. 7 weights
register_method("bsce-mlp", "mlp", partial(SingleHeadCriterion, "bsce-mlp", "mlp", kind="bsce", key="z"),
                {"m": 0.0, "weighted_mean": "weights"})  # Appendix C: branch z alone trained with BSCE
register_method("ldam-drw", "plain", partial(LDAMDRWCriterion, "ldam-drw", "plain"),
                {"max_margin": 0.5, "scale": 30.0, "drw_epoch": 160, "drw_beta": 0.9999}, {"normed": True})
register_method("bib", "bib", _bib_family("bib", "bib", "bib", {}), _BIB)
register_method("mbib", "mbib", _bib_family("mbib", "mbib", "mbib", {}), _MBIB)
register_method("se-mbib", "mbib", _bib_family("se-mbib", "mbib", "se", {}), _MBIB)
register_method("all-mbib", "mbib", _bib_family("all-mbib", "mbib", "all", {}), _MBIB)
# Appendix B ablations: "Balanced" off = plain CE on both heads (no log n_i, no Eq. 7 weights); beta = 0 = no VSD
register_method("ce-2branch", "bib",
                _bib_family("ce-2branch", "bib", "bib", {"beta": 0.0, "m": 0.0, "gamma": 0.0, "logit_adjust": False}))
register_method("bsce-2branch", "bib", _bib_family("bsce-2branch", "bib", "bib", {"beta": 0.0, "gamma": 0.0}),
                {"m": 0.1, "weighted_mean": "weights", "logit_adjust": True})
register_method("sdib", "bib", _bib_family("sdib", "bib", "bib", {"m": 0.0, "logit_adjust": False}),
                {"beta": L.DEFAULT_BETA, "gamma": 0.0})
