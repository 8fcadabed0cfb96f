"""The one method registry: name -> model head, loss factory, default hyperparameters and training task.

Every method registers itself beside its code (the built-in losses in criteria.py, GML in mbib.gml, ...), and
mbib.losses imports each such module once, so importing mbib.losses lists every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mbib.errors import ConfigError
from mbib.losses import functional as L
from mbib.train.task import Task

if TYPE_CHECKING:
    from mbib.losses.criteria import Criterion

HEADS = ("plain", "bib", "mbib", "mlp")

Factory = Callable[..., "Criterion"]
TaskFactory = Callable[..., Task]  # (cfg, network, criterion) -> Task


@dataclass(frozen=True)
class MethodSpec:
    head: str
    factory: Factory
    defaults: Mapping[str, Any]
    model_options: Mapping[str, Any] = field(default_factory=dict)
    task: TaskFactory = Task
    recipe: Mapping[str, Any] = field(default_factory=dict)  # config settings of the method's published results


_SPECS: dict[str, MethodSpec] = {}
METHODS: dict[str, str] = {}  # method -> head it needs ("plain" / "bib" / "mbib" / "mlp")
METHOD_MODEL_OPTIONS: dict[str, dict[str, Any]] = {}  # method -> build_model options (head, normed)


def register_method(name: str, head: str, factory: Factory, defaults: Mapping[str, Any] | None = None,
                    model_options: Mapping[str, Any] | None = None, task: TaskFactory = Task,
                    recipe: Mapping[str, Any] | None = None) -> None:
    """Add a method: ``factory(class_counts: float64 Tensor [K], **hparams) -> Criterion`` receives the
    method's ``defaults`` overridden by the caller's values for those names; ``model_options`` are extra
    build_model options (besides head) the method's model needs; ``task(cfg, network, criterion)`` builds
    what the engine trains (mbib.train.task.Task: plain classification); ``recipe`` the dotted config settings
    its published numbers were trained with beyond the paper's (e.g. GML's strong augmentation), which
    reproductions apply."""
    if head not in HEADS:
        raise ConfigError(f"head {head!r} of method {name!r} is unknown; use one of {', '.join(HEADS)}")
    if name in _SPECS and _SPECS[name].factory is not factory:
        raise ConfigError(f"loss method {name!r} is already registered; pick another name")
    _SPECS[name] = MethodSpec(head, factory, dict(defaults or {}), dict(model_options or {}), task, dict(recipe or {}))
    METHODS[name] = head
    METHOD_MODEL_OPTIONS[name] = {"head": head, **(model_options or {})}


def method_defaults(method: str) -> dict[str, Any]:
    """The hyperparameters ``method`` takes, with their defaults."""
    return dict(_spec(method).defaults)


def method_recipe(method: str) -> dict[str, Any]:
    """The dotted config settings ``method``'s published results use beyond the paper's setup."""
    return dict(_spec(method).recipe)


def method_task(method: str) -> TaskFactory:
    """What builds ``method``'s training task from (cfg, network, criterion)."""
    return _spec(method).task


def _spec(method: str) -> MethodSpec:
    if method not in _SPECS:
        raise ConfigError(f"unknown loss method {method!r}; use one of {', '.join(sorted(_SPECS))}")
    return _SPECS[method]


def method_settings(method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What ``method``'s factory gets: its defaults, overridden by the given values for the names it takes."""
    defaults = _spec(method).defaults
    return {**defaults, **{k: v for k, v in hparams.items() if k in defaults}}


def build_criterion(method: str, class_counts: Any, **hparams: Any) -> Criterion:
    """The loss module of ``method``. Names no registered method takes raise ConfigError (typos); names
    other methods take but this one does not are ignored, so one config can drive every method."""
    spec = _spec(method)
    known = {name for s in _SPECS.values() for name in s.defaults}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ConfigError(f"unknown loss hyperparameter(s) {unknown}; known: {', '.join(sorted(known))}")
    for name in ("logit_adjust", "detach_shallow"):
        if name in hparams and not isinstance(hparams[name], bool):
            raise ConfigError(f"loss option {name}={hparams[name]!r} must be true or false")
    return spec.factory(L.as_class_counts(class_counts), **method_settings(method, hparams))
