"""TappedNet: a tapped backbone, a classifier on every observation v_i, and z = act(FC(v_n)) with its head g.

One network class for every method: MBIB's heads and the baselines' single classifier are its `head` settings.

Fig. 2 of the paper: v1, v2, v3 are GAP'd outputs of CNN1..CNN3 with classifiers h, u, f; z = FC(v3) with
classifier g; the prediction is the mean of f(v3) and g(z) (Sec. 4.2). Heads per `head`:
  "mbib":  every tap + z        (MBIB, Eq. 11; SE-/ALL-MBIB use the same net, only the loss differs)
  "bib":   final tap + z        (BIB, Fig. 1; the two-branch baselines)
  "plain": final tap only       (a normal classifier: CE, focal, BSCE, LDAM-DRW)
  "mlp":   z only               (BSCE_MLP of Table 5)
Logit keys: "v1".."vn" shallow -> deep ("vn" is the final observation), "x" for the optional input tap
(Table 4's 4-MBIB(x)), and "z". Only keys whose head exists are returned.

z width. Default z_dim = width of the final tap, with ReLU. For ResNet-32 MBIB with 100 classes:
  backbone 463,504 + h 16*100+100 = 1,700 + u 32*100+100 = 3,300 + f 64*100+100 = 6,500
  + FC 64*64+64 = 4,160 + g 64*100+100 = 6,500  =  485,664 parameters,
i.e. 356 (0.073%) under Table 6's 486.02k. In general total = 475,104 + 165 * z_dim, so no integer z_dim
hits 486,020 exactly (66 -> 485,994; 67 -> 486,159); 64 is the natural width, matching v3, within 0.1%.
For the 224 models the same rule gives z_dim = 512 (ResNet-10) and 2048 (ResNet-50, ResNeXt-50).

Neck (`neck`, an investigation switch; default "none" as above). The paper does not draw one, but the 356
missing parameters fit a BatchNorm1d on each observation before its classifier and inside z
(z = act(BN(FC(v)))): (16 + 32 + 64 + 64) x 2 = 352, giving 486,016 = Table 6's 486.02k, the layout of the
variational self-distillation code BIB builds on (Tian et al.). The count does not say whether z reads v_n
before or after v_n's BN, so both are offered:
  "bn":      the classifiers read BN(v_i); z = act(BN(FC(v_n))) reads the raw v_n (as VSD's code branches off)
  "bn-post": the same, but z reads BN(v_n) (one normalised observation feeds both f and z)
In eval mode each BN is an affine map, so the exported graph folds it (no new operator at inference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mbib.errors import ConfigError
from mbib.models.backbone import Backbone

HEADS = ("mbib", "bib", "plain", "mlp")
NECKS = ("none", "bn", "bn-post")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM (Cao et al.): logits = <x/|x|, w_k/|w_k|>, no bias; the loss scales them."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def final_tap_key(keys) -> str | None:
    """The "v" key with the largest index (the final observation), or None if there is none."""
    v_keys = [k for k in keys if k.startswith("v") and k[1:].isdigit()]
    return max(v_keys, key=lambda k: int(k[1:]), default=None)


def ensemble_logits(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prediction: mean of final-tap and z logits when both exist, else whichever exists (Sec. 4.2)."""
    present = [k for k in (final_tap_key(outputs), "z") if k is not None and k in outputs]
    if not present:
        raise ConfigError(f"outputs have keys {sorted(outputs)} but need a 'v<i>' or 'z' key; pass model(x)'s dict")
    return torch.stack([outputs[k] for k in present]).mean(dim=0)


class TappedNet(nn.Module):
    """Backbone taps -> classifiers (h, u, f, ...) and z = act(FC(v_n)) -> g; see the module docstring.

    Not MBIB-only: head="plain" is the baselines' ordinary classifier, head="mlp" Table 5's z-only branch.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        head: str = "mbib",
        z_dim: int | None = None,
        z_act: str = "relu",
        normed: bool = False,
        input_tap: bool = False,
        neck: str = "none",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
        if z_act not in ACTIVATIONS:
            raise ConfigError(f"unknown z_act {z_act!r}; use one of {', '.join(ACTIVATIONS)}")
        if neck not in NECKS:
            raise ConfigError(f"unknown neck {neck!r}; use one of {', '.join(NECKS)}")
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is too small; a classifier needs at least 2 classes")
        if input_tap and head != "mbib":
            raise ConfigError(f"input_tap needs head='mbib' (got {head!r}); drop input_tap or use head='mbib'")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = head
        channels = list(backbone.tap_channels)
        n_v = len(channels) - int(input_tap)
        all_keys = (["x"] if input_tap else []) + [f"v{i}" for i in range(1, n_v + 1)]
        self._all_tap_keys = all_keys
        self._widths = dict(zip(all_keys, channels))
        final = all_keys[-1]
        self.tap_keys: list[str] = {"mbib": all_keys, "bib": [final], "plain": [final], "mlp": []}[head]
        self.has_z = head in ("mbib", "bib", "mlp")
        self.z_dim = (z_dim or self._widths[final]) if self.has_z else 0
        if self.has_z and self.z_dim < 1:
            raise ConfigError(f"z_dim={z_dim} is invalid; use a positive integer or leave it unset")
        classifier = NormedLinear if normed else nn.Linear
        self.heads = nn.ModuleDict({k: classifier(self._widths[k], num_classes) for k in self.tap_keys})
        self.neck = neck
        normed_keys = self.tap_keys + ([final] if neck == "bn-post" and final not in self.tap_keys else [])
        self.necks = nn.ModuleDict({k: nn.BatchNorm1d(self._widths[k]) for k in normed_keys} if neck != "none" else {})
        if self.has_z:
            z_norm = [nn.BatchNorm1d(self.z_dim)] if neck != "none" else []  # Linear -> BN -> activation
            self.z_fc = nn.Sequential(nn.Linear(self._widths[final], self.z_dim), *z_norm, ACTIVATIONS[z_act]())
            self.heads["z"] = classifier(self.z_dim, num_classes)
        for m in [*self.heads.modules(), *(self.z_fc.modules() if self.has_z else [])]:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)  # He init of linear layers, as the LDAM ResNet-32 does

    @property
    def output_keys(self) -> list[str]:
        """Logit keys of forward(), shallow -> deep then "z"."""
        return self.tap_keys + (["z"] if self.has_z else [])

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Representations [B, D] under the same keys as forward(): GAP'd taps (after the neck's BN, what each
        classifier reads) and z (for rho, Eq. 15-17)."""
        taps = dict(zip(self._all_tap_keys, self.backbone(x)))
        normed = {k: self.necks[k](taps[k]) for k in self.necks}
        feats = {k: normed.get(k, taps[k]) for k in self.tap_keys}
        if self.has_z:
            final = self._all_tap_keys[-1]
            feats["z"] = self.z_fc(normed[final] if self.neck == "bn-post" else taps[final])
        return feats

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self.heads[k](r) for k, r in self.features(x).items()}

    def ensemble_logits(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return ensemble_logits(outputs)
