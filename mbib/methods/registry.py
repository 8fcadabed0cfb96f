"""The one method registry: name -> model head, loss factory, default hyperparameters and training task.

Every method registers itself in its own module under mbib.methods (bib.py, gml.py, ...), and mbib.methods imports
each such module once, so importing mbib.methods lists every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mbib.errors import ConfigError
from mbib.losses import functional as L
from mbib.methods.task import Task

if TYPE_CHECKING:
    from mbib.methods.criterion import Criterion

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
    config_names: Mapping[str, str] = field(default_factory=dict)  # LossConfig field -> the hyperparameter it sets


_SPECS: dict[str, MethodSpec] = {}
METHODS: dict[str, str] = {}  # method -> head it needs ("plain" / "bib" / "mbib" / "mlp")
METHOD_MODEL_OPTIONS: dict[str, dict[str, Any]] = {}  # method -> build_model options (head, normed)


def register_method(name: str, head: str, factory: Factory, defaults: Mapping[str, Any] | None = None,
                    model_options: Mapping[str, Any] | None = None, task: TaskFactory = Task,
                    recipe: Mapping[str, Any] | None = None, config_names: Mapping[str, str] | None = None) -> None:
    """Add a method: ``factory(class_counts: float64 Tensor [K], **hparams) -> Criterion`` receives the
    method's ``defaults`` overridden by the caller's values for those names; ``model_options`` are extra
    build_model options (besides head) the method's model needs; ``task(cfg, network, criterion)`` builds
    what the engine trains (mbib.methods.task.Task: plain classification); ``recipe`` the dotted config settings
    its published numbers were trained with beyond the paper's (e.g. GML's strong augmentation), which
    reproductions apply; ``config_names`` the loss config fields that set a hyperparameter of another name
    (GML: gml_weight -> con_weight)."""
    if head not in HEADS:
        raise ConfigError(f"head {head!r} of method {name!r} is unknown; use one of {', '.join(HEADS)}")
    if name in _SPECS and _SPECS[name].factory is not factory:
        raise ConfigError(f"loss method {name!r} is already registered; pick another name")
    _SPECS[name] = MethodSpec(head, factory, dict(defaults or {}), dict(model_options or {}), task, dict(recipe or {}),
                              dict(config_names or {}))
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


def config_hparam(config_field: str) -> str | None:
    """The hyperparameter a loss config field sets: the name a method registered for it, else the field's own name
    when some method takes it; None when none does (the field is the loop's or a task's, e.g. gml_views)."""
    for spec in _SPECS.values():
        if config_field in spec.config_names:
            return spec.config_names[config_field]
    return config_field if any(config_field in spec.defaults for spec in _SPECS.values()) else None


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
