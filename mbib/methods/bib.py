"""BIB and MBIB (Lan et al.) and their variants: SE-/ALL-MBIB and the Appendix B ablations (ce-2branch,
bsce-2branch, sdib). The loss maths is mbib.losses.functional (Eq. 4-13); here the loss module that caches its
per-class constants, the task that ramps the VSD weight, and the registrations with the paper's settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mbib.errors import ConfigError
from mbib.losses import functional as L
from mbib.methods.criterion import Criterion
from mbib.methods.registry import register_method
from mbib.methods.task import Task, VSDRamp, vsd_warmup_epochs

if TYPE_CHECKING:
    from mbib.config import TrainConfig


class BIBCriterion(Criterion):
    """BIB, MBIB, SE-/ALL-MBIB and the Appendix B ablations (ce-2branch, bsce-2branch, sdib)."""

    def __init__(self, method: str, head: str, class_counts: Tensor, *, wiring: str, beta: float, m: float,
                 gamma: float, a: float = 0.0, b: float = 0.0, weighted_mean: str = "weights",
                 logit_adjust: bool = True, vsd_logits: str = "raw", detach_shallow: bool = True) -> None:
        super().__init__(method, head, class_counts)
        self.wiring = L.check_choice("wiring", wiring, L.WIRINGS)
        self.weighted_mean = L.check_choice("weighted_mean", weighted_mean, L.WEIGHTED_MEANS)
        self.vsd_logits = L.check_choice("vsd_logits", vsd_logits, L.VSD_LOGITS)
        self.detach_shallow = bool(detach_shallow)
        self.a, self.b, self.beta = (L.check_nonnegative(n, v) for n, v in (("a", a), ("b", b), ("beta", beta)))
        consts = L.class_constants(class_counts, m, gamma, logit_adjust)
        self.register_buffer("log_prior", consts.log_prior, persistent=False)
        self.register_buffer("weights", consts.weights, persistent=False)
        self.register_buffer("temperature", consts.temperature, persistent=False)

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        taps = L.tap_keys(outputs)
        if len(taps) < (1 if self.wiring == "bib" else 2):
            raise ConfigError(f"loss '{self.method}' needs more observations 'v1'..'vn' than the model gave "
                              f"({sorted(outputs)}); build the model with head='{self.head}'")
        pairs = L.bib_pairs(taps, self.a, self.b, self.wiring)
        keys = sorted({k for pair in pairs for k in pair[:2]})
        consts = L.ClassConstants(self.log_prior, self.weights, self.temperature)
        return L.mixture_terms(self.logits(outputs, keys), labels, consts, pairs, self.beta, self.weighted_mean,
                               self.vsd_logits, self.detach_shallow)


class BIBTask(Task):
    """BIB, MBIB and their ablations: plain classification with the VSD weight beta ramped up per step."""

    def __init__(self, cfg: TrainConfig, network: nn.Module, criterion: Criterion) -> None:
        super().__init__(cfg, network, criterion)
        self.ramp = VSDRamp(criterion, vsd_warmup_epochs(cfg))


def _bib_family(method: str, head: str, wiring: str, fixed: Mapping[str, Any]) -> Callable[..., Criterion]:
    def factory(class_counts: Tensor, **hparams: Any) -> Criterion:
        return BIBCriterion(method, head, class_counts, wiring=wiring, **{**fixed, **hparams})
    return factory


_BIB = {"beta": L.DEFAULT_BETA, "m": L.DEFAULT_M, "gamma": L.DEFAULT_GAMMA, "weighted_mean": "weights",
        "logit_adjust": True, "vsd_logits": "raw"}
_MBIB = {**_BIB, "a": L.DEFAULT_A, "b": L.DEFAULT_B, "detach_shallow": True}

register_method("bib", "bib", _bib_family("bib", "bib", "bib", {}), _BIB, task=BIBTask)
register_method("mbib", "mbib", _bib_family("mbib", "mbib", "mbib", {}), _MBIB, task=BIBTask)
register_method("se-mbib", "mbib", _bib_family("se-mbib", "mbib", "se", {}), _MBIB, task=BIBTask)
register_method("all-mbib", "mbib", _bib_family("all-mbib", "mbib", "all", {}), _MBIB, task=BIBTask)
# Appendix B ablations: "Balanced" off = plain CE on both heads (no log n_i, no Eq. 7 weights); beta = 0 = no VSD
register_method("ce-2branch", "bib",
                _bib_family("ce-2branch", "bib", "bib", {"beta": 0.0, "m": 0.0, "gamma": 0.0, "logit_adjust": False}),
                task=BIBTask)
register_method("bsce-2branch", "bib", _bib_family("bsce-2branch", "bib", "bib", {"beta": 0.0, "gamma": 0.0}),
                {"m": L.DEFAULT_M, "weighted_mean": "weights", "logit_adjust": True}, task=BIBTask)
register_method("sdib", "bib", _bib_family("sdib", "bib", "bib", {"m": 0.0, "logit_adjust": False}),
                {"beta": L.DEFAULT_BETA, "gamma": L.DEFAULT_GAMMA}, task=BIBTask)
