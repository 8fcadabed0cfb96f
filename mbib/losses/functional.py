"""Pure loss maths of BIB / MBIB (Lan et al., Sec. 3.2-3.3, Appendix J) and the long-tail baselines.

Where the paper's text and its Appendix J code differ, Appendix J is the default:

1. Weighted mean of the BSC loss (switch ``weighted_mean``). Appendix J calls
   ``F.cross_entropy(weight=w, reduction="mean")``, which divides sum_b w_{y_b} CE_b by sum_b w_{y_b};
   Eq. 5-7 read literally give the plain expectation (1/B) sum_b w_{y_b} CE_b. "weights" (default,
   Appendix J) or "batch" (text). They agree when m = 0 or the batch has one class.
2. Eq. 7 is written with class frequencies d_i = n_i / N, Appendix J uses counts n_i; the factor N
   cancels in the normalisation, so the weights are identical (we compute them from counts).
3. Temperatures (Eq. 8 text, Appendix J lines 18-28): both divide the logits of q(y|v) and q(y|z) by
   T_i = (n_max / n_i)^gamma inside the softmax, only in the VSD loss (never in the BSC loss), and
   neither multiplies the KL by T^2 (as Hinton-style distillation would); we do the same, no switch.
4. Appendix J evaluates p_T * log(p_T), which is 0 * -inf = NaN once a teacher probability underflows
   to 0; we take log_softmax and exponentiate it, the same value without the NaN.
5. Which logits VSD compares is not said in the text; Appendix J passes the raw head outputs f and g (switch
   ``vsd_logits``: "raw", default) whose softmax is the balanced posterior the BSC loss leaves them with;
   "adjusted" compares softmax(f + log n) and softmax(g + log n), the training-distribution posteriors each
   BSC loss fits (an investigation switch, not the paper's).
6. The VSD loss is a plain batch mean in both (not class weighted); we follow that. With
   ``reduction="none"`` Appendix J still returns a batch-mean VSD added to per-sample BSC losses;
   we only offer batch means.
7. Logit adjustment (Eq. 4/23) adds log n_i; Appendix J adds log of the counts too. Adding log d_i
   instead shifts every logit by -log N and leaves the softmax unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mbib.errors import ConfigError

WEIGHTED_MEANS = ("weights", "batch")
VSD_LOGITS = ("raw", "adjusted")
WIRINGS = ("bib", "mbib", "se", "all")
# The paper's loss settings, written down once: the registry's method defaults and the keyword defaults below
DEFAULT_BETA = 5.0  # Appendix J hard-codes beta = 5; Sec. 4.2 picks beta from {0..5} per dataset
DEFAULT_A, DEFAULT_B = 0.1, 0.3  # Sec. 4.2: weights of BIB(v1, z) and BIB(v2, z) (Eq. 11) on every dataset
DEFAULT_M = 0.1  # Sec. 4.2 and Appendix J's label_weighting: the Eq. 7 exponent on every dataset
DEFAULT_GAMMA = 0.0  # Sec. 4.2: CIFAR-100-LT (ImageNet-LT and iNaturalist use 0.5: their presets set it)


def check_nonnegative(name: str, value: Any) -> float:
    """Reject a negative, non-finite or non-numeric hyperparameter with a one-line ConfigError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss hyperparameter {name}={value!r} is not a number; pass a float >= 0") from None
    if not number >= 0.0 or number == float("inf"):
        raise ConfigError(f"loss hyperparameter {name}={value!r} must be a finite number >= 0; fix the value")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"loss option {name}={value!r} is unknown; use one of {', '.join(choices)}")
    return value


def as_class_counts(class_counts: Any) -> Tensor:
    """Training samples per class as a float64 CPU tensor [K]; accepts a list, ndarray or tensor."""
    try:
        counts = torch.as_tensor(class_counts).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError("class_counts must be a list of per-class training counts; pass data.class_counts") from None
    if counts.ndim != 1 or counts.numel() < 2:
        raise ConfigError(f"class_counts must be 1-D with one entry per class (>= 2), got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        raise ConfigError("class_counts must all be positive; drop classes that have no training samples")
    return counts


def log_prior(counts: Tensor) -> Tensor:
    """log n_i, added to the logits by balanced softmax."""
    return counts.log()  # Eq. 4 / Eq. 23: q_s(y_i|v) proportional to n_i exp(f_i)


def class_weights(counts: Tensor, m: float) -> Tensor:
    """Eq. 7 from counts; d_i = n_i / N gives the same weights because N cancels."""
    inv = counts.pow(-m)  # Eq. 7: (1/d_i)^m up to the common factor N^m
    return counts.numel() * inv / inv.sum()  # Eq. 7: w_i = K (1/d_i)^m / sum_j (1/d_j)^m


def temperatures(counts: Tensor, gamma: float) -> Tensor:
    """Class-dependent self-distillation temperatures (Sec. 3.2, below Eq. 8)."""
    return (counts.max() / counts).pow(gamma)  # Eq. 8: T_i = (n_max / n_i)^gamma


@dataclass(frozen=True)
class ClassConstants:
    """Per-class constants of one BIB loss, float32 [K] each (zeros / ones where a part is switched off)."""

    log_prior: Tensor
    weights: Tensor
    temperature: Tensor

    def to(self, like: Tensor) -> ClassConstants:
        """Move to the device of ``like``; a no-op when already there."""
        return ClassConstants(*(t.to(like.device) for t in (self.log_prior, self.weights, self.temperature)))


def class_constants(class_counts: Any, m: float = DEFAULT_M, gamma: float = DEFAULT_GAMMA,
                    logit_adjust: bool = True) -> ClassConstants:
    """Everything BIB needs per class; logit_adjust=False gives the unbalanced CE of Appendix B / Table 9."""
    counts = as_class_counts(class_counts)
    m = check_nonnegative("m", m)
    gamma = check_nonnegative("gamma", gamma)
    prior = log_prior(counts) if logit_adjust else torch.zeros_like(counts)
    return ClassConstants(prior.float(), class_weights(counts, m).float(), temperatures(counts, gamma).float())


def balanced_ce(logits: Tensor, labels: Tensor, consts: ClassConstants, weighted_mean: str = "weights") -> Tensor:
    """BSC loss of one head: class-weighted cross entropy of the logit-adjusted softmax."""
    nll = F.cross_entropy(logits + consts.log_prior, labels, reduction="none")  # Eq. 5/6: -log q_s(y|v), Eq. 4
    w = consts.weights[labels]  # Eq. 7: weight of each sample's class
    if weighted_mean == "weights":
        return (w * nll).sum() / w.sum()  # Appendix J: F.cross_entropy(weight=w) normalises by sum of w_y
    return (w * nll).mean()  # Eq. 5-7 literally: E_p[w_y * -log q_s(y|v)]


def vsd_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: Tensor, detach_teacher: bool = True) -> Tensor:
    """Variational self-distillation: KL(q(y|v) || q(y|z)), the teacher detached (Sec. 3.2) unless
    ``detach_teacher`` is False (MBIB's undetached shallow teachers, see mixture_terms)."""
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits
    log_p = F.log_softmax(teacher / temperature, dim=-1)  # Eq. 8: q(y_i|v) = softmax(f_i / T_i)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # Eq. 8: q(y_i|z) = softmax(g_i / T_i)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()  # Eq. 8: E[sum_y q(y|v)(log q(y|v) - log q(y|z))]


def bib_pair(
    teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, consts: ClassConstants, weighted_mean: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The three parts of BIB(teacher, student): BSC on each head and the VSD between them."""
    bsc_t = balanced_ce(teacher_logits, labels, consts, weighted_mean)  # Eq. 5: Loss_1
    bsc_s = balanced_ce(student_logits, labels, consts, weighted_mean)  # Eq. 6: Loss_2
    return bsc_t, bsc_s, vsd_loss(teacher_logits, student_logits, consts.temperature)  # Eq. 8: Loss_3


def bib_total(bsc_t: Tensor, bsc_s: Tensor, vsd: Tensor, beta: float) -> Tensor:
    return bsc_t + bsc_s + beta * vsd  # Eq. 9 / Eq. 12: Loss_1 + Loss_2 + beta * Loss_3


def bib_loss_terms(
    v_logits: Tensor,
    z_logits: Tensor,
    labels: Tensor,
    class_counts: Any,
    beta: float,
    m: float = DEFAULT_M,
    gamma: float = DEFAULT_GAMMA,
    *,
    weighted_mean: str = "weights",
    logit_adjust: bool = True,
) -> dict[str, Tensor]:
    """BIB(v, z) of Eq. 9 as dict(bsc_v, bsc_z, vsd, total); see the module docstring for text vs Appendix J."""
    beta = check_nonnegative("beta", beta)
    check_choice("weighted_mean", weighted_mean, WEIGHTED_MEANS)
    consts = class_constants(class_counts, m, gamma, logit_adjust).to(v_logits)
    bsc_v, bsc_z, vsd = bib_pair(v_logits, z_logits, labels, consts, weighted_mean)
    return {"bsc_v": bsc_v, "bsc_z": bsc_z, "vsd": vsd, "total": bib_total(bsc_v, bsc_z, vsd, beta)}


def bib_loss(v_logits: Tensor, z_logits: Tensor, labels: Tensor, class_counts: Any, beta: float,
             m: float = DEFAULT_M, gamma: float = DEFAULT_GAMMA, **switches: Any) -> Tensor:
    """Loss_BIB(v, z) of Eq. 9 (the ``total`` of bib_loss_terms)."""
    return bib_loss_terms(v_logits, z_logits, labels, class_counts, beta, m, gamma, **switches)["total"]


def tap_keys(outputs: Mapping[str, Tensor]) -> list[str]:
    """The observation keys present in a model's outputs, shallow to deep: "x" (the input tap of Table 4's
    4-MBIB(x)) first when there, then "v1".."vn"."""
    keys = sorted((k for k in outputs if k.startswith("v") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    return (["x"] if "x" in outputs else []) + keys


def tap_weights(n_taps: int, a: float, b: float) -> list[float]:
    """Weights of BIB(v_i, .) for n observations, shallow to deep (Eq. 11 generalised).

    Eq. 11 gives (a, b, 1) for three taps. For more taps the shallowest keeps a and every other
    non-final tap gets b (Table 4 uses a = b = 0.3 for 4-6 taps, so only this split is implied).
    Table 4 builds 2-MBIB as 3-MBIB with a = 0, so with two taps the single intermediate tap gets b.
    """
    if n_taps == 1:
        return [1.0]
    if n_taps == 2:
        return [b, 1.0]  # Eq. 11 with a = 0 (Table 4, 2-MBIB)
    return [a] + [b] * (n_taps - 2) + [1.0]  # Eq. 11: a BIB(v1,z) + b BIB(v2,z) + ... + BIB(vn,z)


def bib_pairs(taps: Sequence[str], a: float, b: float, wiring: str) -> list[tuple[str, str, float]]:
    """(teacher, student, weight) of every BIB term.

    "bib": BIB(vn, z) only (Eq. 9). "mbib": Eq. 11, every tap distilled into z. "se" (SE-MBIB,
    Fig. 5a, Sec. 5): the chain a BIB(v1,v2) + b BIB(v2,v3) + BIB(v3,z), the shallower observation
    being the detached teacher, as z is in BIB(v, z). "all" (ALL-MBIB, Fig. 5b): Sec. 5 calls it the
    sequential connections "on top of MBIB", so MBIB's terms plus the chain's v-to-v terms with the
    same a/b weights (BIB(vn, z) is shared and counted once).
    """
    if wiring == "bib":
        return [(taps[-1], "z", 1.0)]
    weights = tap_weights(len(taps), a, b)
    to_z = [(t, "z", w) for t, w in zip(taps, weights)]
    chain = [(t, s, w) for t, s, w in zip(taps, [*taps[1:], "z"], weights)]
    if wiring == "mbib":
        return to_z
    if wiring == "se":
        return chain
    return to_z + chain[:-1]


def pair_term_names(teacher: str, student: str) -> tuple[str, str, str]:
    """Names of BSC(teacher), BSC(student), VSD in BIB(teacher, student): "bsc_v1", "bsc_z@v1", "vsd_v1"."""
    if student == "z":
        return f"bsc_{teacher}", f"bsc_z@{teacher}", f"vsd_{teacher}"
    return f"bsc_{teacher}@{student}", f"bsc_{student}@{teacher}", f"vsd_{teacher}@{student}"


def mixture_terms(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    consts: ClassConstants,
    pairs: Sequence[tuple[str, str, float]],
    beta: float,
    weighted_mean: str,
    vsd_logits: str = "raw",
    detach_shallow: bool = True,
) -> dict[str, Tensor]:
    """Unweighted parts of every BIB term and their weighted sum as "total".

    ``detach_shallow``: Sec. 3.2 states the detached teacher for BIB(v, z); for MBIB's shallow teachers
    (every teacher but the final observation) Sec. 3.3 says only that the mixture lets "shallow layers learn
    from deeper ones". True (default, Appendix J's code detaches every teacher) stops VSD's gradient at every
    teacher; False lets it reach the shallow ones, pulling q(y|v_i) toward q(y|z) as well.
    """
    terms: dict[str, Tensor] = {}
    bsc: dict[str, Tensor] = {}  # a head's BSC loss is the same in every pair it joins: compute it once
    total = None
    shift = consts.log_prior if vsd_logits == "adjusted" else 0.0  # module docstring, item 5
    taps = tap_keys(outputs)
    final = taps[-1] if taps else None  # the final observation's teacher is always detached
    for teacher, student, weight in pairs:
        for key in (teacher, student):
            if key not in bsc:
                bsc[key] = balanced_ce(outputs[key], labels, consts, weighted_mean)  # Eq. 5/6
        detach = detach_shallow or teacher == final
        vsd = vsd_loss(outputs[teacher] + shift, outputs[student] + shift, consts.temperature, detach)  # Eq. 8 / 13
        parts = (bsc[teacher], bsc[student], vsd)
        terms.update(zip(pair_term_names(teacher, student), parts))
        weighted = weight * bib_total(*parts, beta)  # Eq. 11: a, b or 1 times Loss_BIB(v_i, z)
        total = weighted if total is None else total + weighted
    terms["total"] = total
    return terms


def mbib_loss_terms(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    class_counts: Any,
    a: float = DEFAULT_A,
    b: float = DEFAULT_B,
    beta: float = DEFAULT_BETA,
    m: float = DEFAULT_M,
    gamma: float = DEFAULT_GAMMA,
    wiring: str = "mbib",
    *,
    weighted_mean: str = "weights",
    logit_adjust: bool = True,
) -> dict[str, Tensor]:
    """Loss_MBIB of Eq. 11 (or SE-/ALL-MBIB) on outputs {"v1".."vn", "z"}, with its parts by name."""
    a, b, beta = (check_nonnegative(n, v) for n, v in (("a", a), ("b", b), ("beta", beta)))
    check_choice("wiring", wiring, WIRINGS)
    check_choice("weighted_mean", weighted_mean, WEIGHTED_MEANS)
    taps = tap_keys(outputs)
    if not taps or "z" not in outputs:
        raise ConfigError(f"MBIB needs logits 'v1'..'vn' and 'z', got {sorted(outputs)}; "
                          "build the model with head='mbib'")
    consts = class_constants(class_counts, m, gamma, logit_adjust).to(outputs["z"])
    return mixture_terms(outputs, labels, consts, bib_pairs(taps, a, b, wiring), beta, weighted_mean)


def mbib_loss(outputs: Mapping[str, Tensor], labels: Tensor, class_counts: Any, a: float = DEFAULT_A,
              b: float = DEFAULT_B, beta: float = DEFAULT_BETA, m: float = DEFAULT_M, gamma: float = DEFAULT_GAMMA,
              wiring: str = "mbib",
              **switches: Any) -> Tensor:
    """Loss_MBIB of Eq. 11 (the ``total`` of mbib_loss_terms); a = b = 0 gives Loss_BIB(vn, z) exactly."""
    return mbib_loss_terms(outputs, labels, class_counts, a, b, beta, m, gamma, wiring, **switches)["total"]


def focal_loss(logits: Tensor, labels: Tensor, gamma: float) -> Tensor:
    """Focal loss of Lin et al. (2017) without the alpha balancing."""
    log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return (-(1.0 - log_p.exp()).pow(gamma) * log_p).mean()  # Lin et al.: FL(p_t) = -(1 - p_t)^gamma log p_t


def ldam_margins(counts: Tensor, max_margin: float = 0.5) -> Tensor:
    """LDAM margins of Cao et al. (2019): C / n_j^(1/4), with C set so the rarest class gets max_margin."""
    raw = counts.pow(-0.25)  # Cao et al.: Delta_j proportional to n_j^(-1/4)
    return raw * (max_margin / raw.max())  # Cao et al.: C chosen so max_j Delta_j = max_margin


def drw_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """Class-balanced weights of Cui et al. (2019) used by deferred re-weighting, normalised to sum K."""
    beta_n = torch.pow(torch.as_tensor(beta, dtype=counts.dtype), counts)
    inv_effective = (1.0 - beta) / (1.0 - beta_n)  # Cui et al.: 1 / E_n with E_n = (1 - beta^n) / (1 - beta)
    return counts.numel() * inv_effective / inv_effective.sum()


def ldam_loss(cos_logits: Tensor, labels: Tensor, margins: Tensor, scale: float,
              weights: Tensor | None = None) -> Tensor:
    """LDAM loss: cross entropy of s * (cos - Delta_y on the true class), optionally DRW-weighted."""
    true_class = F.one_hot(labels, cos_logits.shape[-1]).to(cos_logits.dtype)
    adjusted = cos_logits - true_class * margins[labels][:, None]  # Cao et al.: z_y - Delta_y, other logits unchanged
    return F.cross_entropy(scale * adjusted, labels, weight=weights)  # Cao et al.: softmax CE of s * z (weighted mean)
