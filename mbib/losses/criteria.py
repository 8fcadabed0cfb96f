"""Loss modules: per-class constants cached as buffers, forward(outputs, labels) -> (loss, detached terms)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mbib.errors import ConfigError
from mbib.losses import functional as L
from mbib.losses.registry import register_method
from mbib.train.task import BIBTask


class Criterion(nn.Module):
    """Base of every training loss; subclasses implement ``loss_terms`` returning a dict with "total"."""

    def __init__(self, method: str, head: str, class_counts: Tensor) -> None:
        super().__init__()
        self.method = method
        self.head = head
        self.num_classes = int(class_counts.numel())
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every (0-based) epoch; only LDAM-DRW uses it."""
        self.epoch = int(epoch)

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """The loss's own parameters the optimiser must not decay (none but GML's log temperatures)."""
        return []

    def forward(self, outputs: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.loss_terms(outputs, labels)
        return terms["total"], {name: value.detach() for name, value in terms.items()}

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def logits(self, outputs: Mapping[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
        """The named logits in float32 (fp16 softmax / log n lose precision under AMP), shape-checked."""
        missing = [k for k in keys if k not in outputs]
        if missing:
            raise ConfigError(
                f"loss '{self.method}' needs logits {missing} but the model gave {sorted(outputs)}; "
                f"build the model with head='{self.head}'"
            )
        picked = {k: outputs[k].float() for k in keys}
        for key, value in picked.items():
            if value.ndim != 2 or value.shape[1] != self.num_classes:
                raise ConfigError(
                    f"logits '{key}' have shape {tuple(value.shape)} but class_counts has {self.num_classes} "
                    "classes; build the model with num_classes=len(class_counts)"
                )
        return picked

    def final_tap(self, outputs: Mapping[str, Tensor]) -> str:
        taps = L.tap_keys(outputs)
        if not taps:
            raise ConfigError(f"loss '{self.method}' needs a 'v' logit but the model gave {sorted(outputs)}; "
                              f"build the model with head='{self.head}'")
        return taps[-1]


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


class SingleHeadCriterion(Criterion):
    """One head, one loss: "ce", "focal", "bsce" on the final tap, "bsce-mlp" on z."""

    def __init__(self, method: str, head: str, class_counts: Tensor, *, kind: str, key: str = "final",
                 m: float = 0.0, focal_gamma: float = 1.0, weighted_mean: str = "weights") -> None:
        super().__init__(method, head, class_counts)
        self.kind = L.check_choice("kind", kind, ("ce", "focal", "bsce"))
        self.key = key
        self.focal_gamma = L.check_nonnegative("focal_gamma", focal_gamma)
        self.weighted_mean = L.check_choice("weighted_mean", weighted_mean, L.WEIGHTED_MEANS)
        consts = L.class_constants(class_counts, m, 0.0, logit_adjust=True)
        self.register_buffer("log_prior", consts.log_prior, persistent=False)
        self.register_buffer("weights", consts.weights, persistent=False)
        self.register_buffer("temperature", consts.temperature, persistent=False)

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        key = self.final_tap(outputs) if self.key == "final" else self.key
        logits = self.logits(outputs, [key])[key]
        if self.kind == "ce":
            loss = F.cross_entropy(logits, labels)
        elif self.kind == "focal":
            loss = L.focal_loss(logits, labels, self.focal_gamma)
        else:
            consts = L.ClassConstants(self.log_prior, self.weights, self.temperature)
            loss = L.balanced_ce(logits, labels, consts, self.weighted_mean)  # Eq. 4-6 (Ren et al. when m = 0)
        return {f"{self.kind}_{key}": loss, "total": loss}


class LDAMDRWCriterion(Criterion):
    """LDAM loss with deferred re-weighting (Cao et al. 2019) on cosine logits of a normed classifier."""

    def __init__(self, method: str, head: str, class_counts: Tensor, *, max_margin: float, scale: float,
                 drw_epoch: int, drw_beta: float) -> None:
        super().__init__(method, head, class_counts)
        if not (L.check_nonnegative("max_margin", max_margin) > 0 and L.check_nonnegative("scale", scale) > 0):
            raise ConfigError(f"max_margin={max_margin} and scale={scale} must both be > 0; fix the LDAM settings")
        if not 0.0 <= L.check_nonnegative("drw_beta", drw_beta) < 1.0:
            raise ConfigError(f"drw_beta={drw_beta} must be in [0, 1); Cao et al. use 0.9999")
        if isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0:
            raise ConfigError(f"drw_epoch={drw_epoch!r} must be an integer >= 0 (the epoch re-weighting starts)")
        self.scale = float(scale)
        self.drw_epoch = drw_epoch
        self.register_buffer("margins", L.ldam_margins(class_counts, max_margin).float(), persistent=False)
        self.register_buffer("drw_weights", L.drw_weights(class_counts, drw_beta).float(), persistent=False)

    def class_weights(self) -> Tensor | None:
        """Uniform before the defer epoch, class-balanced effective-number weights from it on."""
        return self.drw_weights if self.epoch >= self.drw_epoch else None

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        key = self.final_tap(outputs)
        loss = L.ldam_loss(self.logits(outputs, [key])[key], labels, self.margins, self.scale, self.class_weights())
        return {f"ldam_{key}": loss, "total": loss}


# ---------- the built-in methods (GML registers in mbib.gml) ----------
def _bib_family(method: str, head: str, wiring: str, fixed: Mapping[str, Any]) -> Callable[..., Criterion]:
    def factory(class_counts: Tensor, **hparams: Any) -> Criterion:
        return BIBCriterion(method, head, class_counts, wiring=wiring, **{**fixed, **hparams})
    return factory


_BIB = {"beta": L.DEFAULT_BETA, "m": L.DEFAULT_M, "gamma": L.DEFAULT_GAMMA, "weighted_mean": "weights",
        "logit_adjust": True, "vsd_logits": "raw"}
_MBIB = {**_BIB, "a": L.DEFAULT_A, "b": L.DEFAULT_B, "detach_shallow": True}

register_method("ce", "plain", partial(SingleHeadCriterion, "ce", "plain", kind="ce"))
register_method("focal", "plain", partial(SingleHeadCriterion, "focal", "plain", kind="focal"),
                {"focal_gamma": 1.0})  # gamma = 1 as in the focal baseline of Cao et al. (Lin et al. use 2)
register_method("bsce", "plain", partial(SingleHeadCriterion, "bsce", "plain", kind="bsce"),
                {"m": 0.0, "weighted_mean": "weights"})  # Ren et al.: logit adjustment only, no Eq. 7 weights
register_method("bsce-mlp", "mlp", partial(SingleHeadCriterion, "bsce-mlp", "mlp", kind="bsce", key="z"),
                {"m": 0.0, "weighted_mean": "weights"})  # Appendix C: branch z alone trained with BSCE
register_method("ldam-drw", "plain", partial(LDAMDRWCriterion, "ldam-drw", "plain"),
                # Cao et al.: largest margin 0.5, cosine logits x 30, effective-number beta 0.9999 from epoch 160
                {"max_margin": 0.5, "scale": 30.0, "drw_epoch": 160, "drw_beta": 0.9999}, {"normed": True})
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
