"""GML (Suh & Seo, ICML 2023): long-tailed recognition by maximising I(latent; label).

The loss has three parts, each a cross entropy on logit-adjusted (``+ log prior``) scores:

* supervised: cosine logits / ``sup_temperature`` (+ log prior). We fix ``sup_temperature=1/30``, the
  scale the authors' public code uses for its cosine classifier (LDAM's s = 30 too); with 0.1 the logits
  span only [-10, 10], too soft a softmax for 100 classes.
* contrastive: for class c, the log-mean-exp over the queue keys of class c of cos(q, k) / T_c, then
  + log prior (Eq. "S(x, y)" of the paper: a class-conditional kernel density estimate).
* temperature: a second copy of the contrastive term computed on *detached* similarities with the live
  T, while the first copy uses a detached T; so T learns only from the copy and the encoder only from
  the first. T is stored as log T (positive, scale-free steps) and must get no weight decay.
* optional KD from a frozen teacher: KL at temperature 4 (Hinton et al.), scaled by 4^2.

Choices (the issue asks each to be documented):

* per-class temperatures (``per_class_temperature=True``): T_c scales the similarities to class c's keys.
  The authors' CIFAR code shares one scalar T; ``per_class_temperature=False`` reproduces that.
  Initial T = 0.1 (their ``moco-t``).
* queue (``ClassQueue``): 4096 keys for CIFAR, split into per-class FIFO slots of base_k (=2) + a
  share of the rest proportional to the class prior (largest-remainder rounding, so sizes sum exactly).
  Slots start empty and carry a validity mask (the authors fill theirs with random vectors instead);
  classes with no valid key are left out of the softmax, and queries of such classes out of the mean.
* keys are L2-normalised 32-d projections computed by the key encoder and enqueued *before* the loss is
  computed (as published), so a query's class always has at least its own key.
* key encoder: a momentum copy (m=0.999) of backbone + projection, updated inside ``GMLWrapper.forward``
  in training mode before the keys are computed (MoCo order); or a frozen teacher backbone whose keys
  pass through a momentum copy of the query projection (the authors train a separate key projection on
  raw teacher features kept in the queue; we keep projected keys so the queue is encoder-agnostic, which
  requires the teacher's feature width to equal the student's).
* projection heads: Linear(D, 64) -> BN -> ReLU -> Linear(64, 32), on the backbone's final tap ("gml")
  or on z ("mbib-gml").
* views (``loss.gml_views``): 3, as the authors draw, gives the classifier, the query and the key each
  their own augmentation of the image (classifier and query views share one backbone pass, so BN sees
  both); 1 feeds one view to all three (a third of the augmentation and half the backbone work).
* the temperature copy leaves out every queued key of the query's own image (matched by dataset index,
  ``exclude_own_key``), as the authors do: otherwise T could shrink towards the trivial self-match.
  The encoder copy keeps them, as published.
* several GPUs: keys, labels and indices are all-gathered before they are queued, so every rank holds
  the same queue (MoCo's ``concat_all_gather``); the task all-reduces the temperature's gradient.
  MoCo's shuffled BN for the key encoder is not done.

Training: ``GMLTask`` (registered with both methods at the end) wraps the network in a ``GMLWrapper``, feeds it
the extra views and hands the batch's dataset indices to the loss; the engine knows nothing of GML.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mbib.errors import ConfigError
from mbib.losses.functional import tap_keys
from mbib.methods import bib  # noqa: F401  registers "mbib", whose objective and defaults mbib-gml takes
from mbib.methods.criterion import Criterion
from mbib.methods.registry import build_criterion, method_defaults, register_method
from mbib.methods.task import Task, VSDRamp, vsd_warmup_epochs
from mbib.models import build_model

QUERY_KEY = "gml_query"  # [B, dim] L2-normalised query projections (training only)
KEY_KEY = "gml_key"  # [B, dim] L2-normalised keys from the key encoder (training only, no grad)
TEACHER_KEY = "gml_teacher"  # [B, K] teacher logits for KD (training with a teacher only)
INDEX_KEY = "gml_index"  # [B] dataset indices of the batch (GMLTask adds them; own-key exclusion)
AUX_KEYS = (QUERY_KEY, KEY_KEY, TEACHER_KEY, INDEX_KEY)


def logit_outputs(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier logits of a GMLWrapper output, without the auxiliary GML tensors."""
    return {k: v for k, v in outputs.items() if k not in AUX_KEYS}


def slot_sizes(class_counts, size: int, base_k: int) -> torch.Tensor:
    """Per-class queue slot sizes: base_k + a prior-proportional share of the rest, summing to ``size``."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    k = counts.numel()
    spare = size - k * base_k
    if spare < 0 or base_k < 1:
        raise ConfigError(f"GML queue of {size} cannot give {k} classes base_k={base_k} keys each; raise queue_size or lower base_k")
    share = spare * counts / counts.sum()
    floor = share.floor()
    # Largest remainder: hand the rounding leftovers to the largest fractional parts.
    leftover = int(spare - floor.sum().item())
    order = torch.argsort(share - floor, descending=True, stable=True)
    floor[order[:leftover]] += 1
    return floor.long() + base_k


class ClassQueue(nn.Module):
    """A fixed-size key memory split into per-class FIFO slots (the oldest key is overwritten first)."""

    def __init__(self, class_counts, size: int = 4096, dim: int = 32, base_k: int = 2):
        super().__init__()
        sizes = slot_sizes(class_counts, size, base_k)
        starts = torch.cumsum(sizes, 0) - sizes
        self.num_classes = sizes.numel()
        self.register_buffer("sizes", sizes)
        self.register_buffer("starts", starts)
        self.register_buffer("ptr", torch.zeros_like(sizes))  # next write offset inside each slot
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.repeat_interleave(torch.arange(self.num_classes), sizes))
        self.register_buffer("valid", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))  # dataset index of each key

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write keys (and their images' dataset indices) into their class slots in batch order, as if one at a time."""
        labels = labels.to(self.sizes.device)
        onehot = F.one_hot(labels, self.num_classes)
        rank = (onehot.cumsum(0) - 1).gather(1, labels[:, None]).squeeze(1)  # order within its class
        per_class = onehot.sum(0)
        size = self.sizes[labels]
        # Keys that a later key of the same batch would overwrite are dropped (scatter must not collide).
        keep = rank >= per_class[labels] - size
        pos = self.starts[labels] + (self.ptr[labels] + rank) % size
        pos = pos[keep]
        self.keys[pos] = keys.detach()[keep].to(self.keys.dtype)
        self.valid[pos] = True
        self.index[pos] = -1 if index is None else index.to(self.index.device)[keep]
        self.ptr.copy_((self.ptr + per_class) % self.sizes)

    def class_keys(self, c: int) -> torch.Tensor:
        """The valid keys of class c, oldest first."""
        start, n, ptr = int(self.starts[c]), int(self.sizes[c]), int(self.ptr[c])
        slot, valid = self.keys[start:start + n], self.valid[start:start + n]
        if bool(valid.all()):
            return torch.roll(slot, -ptr, 0)  # full slot: the oldest key sits at the write pointer
        return slot[valid]  # partly filled slots fill from offset 0 and have never wrapped


def gml_contrastive_logits(query, queue_keys, queue_labels, mask, num_classes: int, temperature):
    """Per class c: log-mean-exp over class c's usable keys of cos(q, k) / T_c; -inf where c has none.

    ``query`` [B, D] and ``queue_keys`` [S, D] are L2-normalised; ``mask`` [S] (or [B, S], per query) says
    which keys count; ``temperature`` is a scalar or [K]. This is GML's S(x, y) before the log prior.
    """
    temperature = torch.as_tensor(temperature, dtype=query.dtype, device=query.device)
    t_key = temperature.expand(num_classes)[queue_labels] if temperature.dim() else temperature
    sims = (query @ queue_keys.T) / t_key  # cosine similarity / T of the key's class
    mask = mask.expand_as(sims)
    index = queue_labels.expand_as(sims)
    masked = sims.detach().masked_fill(~mask, float("-inf"))
    peak = torch.full((sims.shape[0], num_classes), float("-inf"), dtype=sims.dtype, device=sims.device)
    peak = peak.scatter_reduce(1, index, masked, reduce="amax")  # per-class max keeps exp() in range
    count = mask.to(sims.dtype) @ F.one_hot(queue_labels, num_classes).to(sims.dtype)  # [B, K] usable keys
    present = count > 0
    peak = torch.where(present, peak, torch.zeros_like(peak))
    shifted = (sims - peak.gather(1, index)).masked_fill(~mask, float("-inf"))
    total = torch.zeros_like(peak).index_add(1, queue_labels, shifted.exp())
    # Absent classes take log(1) so their masked gradient stays finite (0 * inf would be NaN).
    lme = torch.log(torch.where(present, total, torch.ones_like(total))) + peak - count.clamp_min(1).log()
    return lme.masked_fill(~present, float("-inf"))


@torch.no_grad()
def gather_from_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over all DDP ranks (rank order); unchanged without a process group.

    Every rank must pass the same shapes: the engine's batches have equal sizes on all ranks.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def adjusted_cross_entropy(logits, labels, log_prior):
    """CE(logits + log prior, y) averaged over the samples whose label class has a finite score."""
    adjusted = logits + log_prior
    usable = torch.isfinite(adjusted.gather(1, labels[:, None]).squeeze(1))
    if not bool(usable.any()):
        return logits.sum() * 0.0 if logits.requires_grad else logits.new_zeros(())
    return F.cross_entropy(adjusted[usable], labels[usable])


def distillation_kl(student_logits, teacher_logits, temperature: float = 4.0):
    """KL(teacher || student) at temperature tau, times tau^2 so gradients keep their scale (Hinton)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def projection_head(in_dim: int, hidden: int = 64, out_dim: int = 32) -> nn.Sequential:
    """The GML/PaCo projection MLP: Linear -> BN -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class GMLWrapper(nn.Module):
    """Wraps a whole mbib network: adds a query projection, a key encoder and, in training, the GML tensors.

    ``forward(x, x_key=None)`` returns the wrapped model's logits dict; in training mode it also holds
    ``gml_query`` [B, 32] (with grad), ``gml_key`` [B, 32] (no grad) and, with a teacher,
    ``gml_teacher`` [B, K]. In eval mode it returns the logits only, like the network it wraps.
    ``feature`` picks the representation the projection reads: "final" (last tap) or "z".
    Logits and features come from one backbone pass (``model.heads`` applied to ``model.features``).
    ``momentum_update()`` runs inside the training forward, so the training loop needs no extra hook.
    """

    def __init__(self, model: nn.Module, feature: str = "final", in_dim: int | None = None, hidden: int = 64,
                 dim: int = 32, momentum: float = 0.999, teacher: nn.Module | None = None):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"GML momentum must be in [0, 1), got {momentum}; use e.g. 0.999")
        self.model = model
        self.momentum = momentum
        self.feature_key = self._resolve_feature(model, feature)
        in_dim = in_dim or self._probe_dim(model, self.feature_key)
        self.query_proj = projection_head(in_dim, hidden, dim)
        self.key_proj = self._frozen_copy(self.query_proj)
        self.teacher = self._frozen_copy(teacher) if teacher is not None else None
        self.key_model = None if teacher is not None else self._frozen_copy(model)
        if teacher is not None and self._probe_dim(teacher, self.feature_key) != in_dim:
            raise ConfigError("GML teacher feature width differs from the student's; use a teacher of the same width")

    @staticmethod
    def _resolve_feature(model: nn.Module, feature: str) -> str:
        if feature == "z":
            return "z"
        if feature == "final":
            return model.tap_keys[-1]
        raise ConfigError(f"unknown GML feature '{feature}'; use 'final' or 'z'")

    @staticmethod
    @torch.no_grad()
    def _probe_dim(model: nn.Module, key: str) -> int:
        was_training = model.training
        model.eval()
        probe = torch.zeros(2, 3, 32, 32, device=next(model.parameters()).device)
        width = model.features(probe)[key].shape[1]
        model.train(was_training)
        return width

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        clone = copy.deepcopy(module)
        for p in clone.parameters():
            p.requires_grad_(False)
        return clone

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def tap_keys(self) -> list[str]:
        return self.model.tap_keys

    def features(self, x):
        return self.model.features(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a frozen teacher keeps its BN statistics
        return self

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query, for the key backbone (momentum mode) and the key projection."""
        pairs = [(self.query_proj, self.key_proj)]
        if self.key_model is not None:
            pairs.append((self.model, self.key_model))
        for online, target in pairs:
            for p, q in zip(online.parameters(), target.parameters()):
                q.mul_(self.momentum).add_(p.detach(), alpha=1.0 - self.momentum)

    def forward(self, x, x_query=None, x_key=None):
        """Training: the classifier's logits on ``x``, the query from ``x_query`` and the key from ``x_key``
        (each defaults to ``x``; 3-view GML passes all three). Eval: the logits of ``x`` only."""
        if not self.training or x_query is None:
            outputs, feats = logits_and_features(self.model, x)
            query_feats = feats
        else:  # classifier and query views share one backbone pass, as the authors batch them
            both = self.model.features(torch.cat([x, x_query]))
            n = len(x)
            outputs = {k: self.model.heads[k](r[:n]) for k, r in both.items()}
            query_feats = {self.feature_key: both[self.feature_key][n:]}
        if not self.training:
            return outputs
        query = F.normalize(self.query_proj(query_feats[self.feature_key]), dim=1)
        self.momentum_update()  # MoCo order: update the key encoder, then encode the keys
        x_key = x if x_key is None else x_key
        with torch.no_grad():
            if self.teacher is not None:
                teacher_logits, key_feats = logits_and_features(self.teacher, x)  # KD on the classifier's view
                outputs[TEACHER_KEY] = teacher_logits[tap_keys(teacher_logits)[-1]]
                key_feats = key_feats if x_key is x else self.teacher.features(x_key)
            else:
                key_feats = self.key_model.features(x_key)
            outputs[KEY_KEY] = F.normalize(self.key_proj(key_feats[self.feature_key]), dim=1)
        outputs[QUERY_KEY] = query
        return outputs


def logits_and_features(model: nn.Module, x):
    """A TappedNet's logits and representations from one backbone pass (its forward is heads(features))."""
    feats = model.features(x)
    return {k: model.heads[k](r) for k, r in feats.items()}, feats


GML_RECIPE = {"data.augment": "strong"}  # GML's published results use AutoAugment + Cutout
GML_CONFIG = {"gml_weight": "con_weight"}  # loss.gml_weight sets the contrastive term's weight
GML_DEFAULTS = {  # the authors' CIFAR settings
    "queue_size": 4096, "base_k": 2, "dim": 32, "sup_temperature": 1.0 / 30.0, "init_temperature": 0.1,
    "per_class_temperature": True, "sup_weight": 1.0, "con_weight": 1.0, "kd_weight": 1.0,
    "kd_temperature": 4.0, "kd_teacher_scale": 1.0, "exclude_own_key": True,
}


class GMLCriterion(Criterion):
    """GML loss with the mbib Criterion interface: ``(outputs, labels) -> (loss, detached terms)``.

    Owns the queue (fed from ``outputs["gml_key"]`` before the contrastive term, as published) and the
    log temperatures (``no_weight_decay_params()``; checkpoint ``state_dict()`` to resume them and the
    queue). With ``base`` (another Criterion, e.g. MBIB's) the base objective replaces the supervised
    term: that is "mbib-gml". Outputs without ``gml_query`` (eval mode) give the supervised/base term only.
    loss = sup_weight * sup + con_weight * (con + con_T) + kd_weight * kd (authors: 1, 1, 1).
    ``kd_teacher_scale`` multiplies teacher logits before KD: 1/sup_temperature for a cosine teacher as
    the authors do, 1 for a teacher with ordinary linear logits.
    """

    def __init__(self, method: str, head: str, class_counts, queue_size: int = 4096, base_k: int = 2,
                 dim: int = 32, sup_temperature: float = 1.0 / 30.0, init_temperature: float = 0.1,
                 per_class_temperature: bool = True, sup_weight: float = 1.0, con_weight: float = 1.0,
                 kd_weight: float = 1.0, kd_temperature: float = 4.0, kd_teacher_scale: float = 1.0,
                 exclude_own_key: bool = True, base: Criterion | None = None):
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        super().__init__(method, head, counts)
        if sup_temperature <= 0 or init_temperature <= 0:
            raise ConfigError("GML temperatures must be positive; use e.g. sup_temperature=1/30, init_temperature=0.1")
        self.register_buffer("log_prior", (counts / counts.sum()).log().float())
        self.queue = ClassQueue(counts, int(queue_size), int(dim), int(base_k))
        shape = (self.num_classes,) if per_class_temperature else (1,)
        self.log_temperature = nn.Parameter(torch.full(shape, math.log(init_temperature)))
        self.sup_temperature = sup_temperature
        self.sup_weight, self.con_weight, self.kd_weight = sup_weight, con_weight, kd_weight
        self.kd_temperature, self.kd_teacher_scale = kd_temperature, kd_teacher_scale
        self.exclude_own_key = exclude_own_key
        self.base = base

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Parameters the optimiser must not decay (decay would pull log T towards T = 1)."""
        return [self.log_temperature]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.base is not None:
            self.base.set_epoch(epoch)

    def contrastive_terms(self, query, labels, index=None):
        """(con, con_T): encoder copy with T detached, temperature copy with similarities detached.

        With the batch's dataset ``index`` and ``exclude_own_key``, the temperature copy skips the queued
        keys of each query's own image (GML's q_idx != k_idx mask); the encoder copy uses every key.
        """
        q = self.queue
        temperature = self.log_temperature.exp()
        own = q.valid
        if index is not None and self.exclude_own_key:
            own = q.valid & (q.index[None, :] != index[:, None])
        query = query.float()
        con = adjusted_cross_entropy(
            gml_contrastive_logits(query, q.keys, q.labels, q.valid, self.num_classes, temperature.detach()),
            labels, self.log_prior)
        con_t = adjusted_cross_entropy(
            gml_contrastive_logits(query.detach(), q.keys, q.labels, own, self.num_classes, temperature),
            labels, self.log_prior)
        return con, con_t

    def loss_terms(self, outputs, labels):
        logits = logit_outputs(outputs)
        if self.base is not None:
            terms = dict(self.base.loss_terms(logits, labels))
            loss = terms.pop("total")
        else:
            sup_logits = self.logits(logits, [self.final_tap(logits)]).popitem()[1]
            sup = F.cross_entropy(sup_logits / self.sup_temperature + self.log_prior, labels)
            loss, terms = self.sup_weight * sup, {"sup": sup}
        if QUERY_KEY in outputs:
            index = outputs.get(INDEX_KEY)
            shared = (outputs[KEY_KEY], labels) if index is None else (outputs[KEY_KEY], labels, index)
            self.queue.enqueue(*gather_from_ranks(*shared))  # before the loss: a query's class has its own key
            con, con_t = self.contrastive_terms(outputs[QUERY_KEY], labels, index)
            loss = loss + self.con_weight * (con + con_t)
            terms.update(con=con, con_T=con_t, T_mean=self.log_temperature.exp().mean())
        if TEACHER_KEY in outputs and self.base is None and self.kd_weight > 0:
            teacher = outputs[TEACHER_KEY].float() * self.kd_teacher_scale
            kd = distillation_kl(sup_logits / self.sup_temperature, teacher, self.kd_temperature)
            loss = loss + self.kd_weight * kd
            terms["kd"] = kd
        terms["total"] = loss
        return terms


# method -> (model head, representation the GML projection reads, extra build_model options)
GML_METHODS: dict[str, tuple[str, str, dict]] = {
    "gml": ("plain", "final", {"normed": True}),  # one cosine classifier, as published
    "mbib-gml": ("mbib", "z", {}),  # MBIB's heads and objective; GML's contrastive term on z
}


class GMLTask(Task):
    """GML as the engine trains it: the network inside a GMLWrapper, ``loss.gml_views`` views per image, the
    batch's dataset indices passed to the loss (own-key exclusion) and, for mbib-gml, MBIB's VSD ramp."""

    capturable = False  # the key queue and its pointer change outside the weights: no CUDA graph holds the step

    def __init__(self, cfg, network: nn.Module, criterion: GMLCriterion, feature: str = "final") -> None:
        self.views = cfg.loss.gml_views
        if self.views not in (1, 3):
            raise ConfigError(f"loss.gml_views={self.views} is not supported: use 3 (as GML publishes) or 1")
        self.feature = feature
        super().__init__(cfg, network, criterion)
        # mbib-gml: the MBIB objective inside keeps its VSD ramp
        self.ramp = None if criterion.base is None else VSDRamp(criterion.base, vsd_warmup_epochs(cfg))

    def wrap(self, network: nn.Module) -> GMLWrapper:
        return GMLWrapper(network, feature=self.feature)

    def inputs(self, batch) -> tuple[torch.Tensor, ...]:
        return (batch.x, *batch.views)  # classifier view, then the query's and the key's when drawn

    def loss(self, outputs, batch):
        return self.criterion({**outputs, INDEX_KEY: batch.index}, batch.y)


def _gml_factory(class_counts, **hparams) -> GMLCriterion:
    return GMLCriterion("gml", "plain", class_counts, **hparams)


def _mbib_gml_factory(class_counts, **hparams) -> GMLCriterion:
    gml = {k: v for k, v in hparams.items() if k in GML_DEFAULTS and k not in ("sup_weight", "kd_weight")}
    rest = {k: v for k, v in hparams.items() if k not in GML_DEFAULTS}
    return GMLCriterion("mbib-gml", "mbib", class_counts, base=build_criterion("mbib", class_counts, **rest), **gml)


def register_gml_methods() -> None:
    """Add "gml" and "mbib-gml" to the method registry (mbib.methods); run on import, idempotent."""
    register_method("gml", "plain", _gml_factory, GML_DEFAULTS, GML_METHODS["gml"][2],
                    task=partial(GMLTask, feature=GML_METHODS["gml"][1]), recipe=GML_RECIPE, config_names=GML_CONFIG)
    mbib_gml = {**method_defaults("mbib"), **{k: v for k, v in GML_DEFAULTS.items() if k not in ("sup_weight", "kd_weight")}}
    register_method("mbib-gml", "mbib", _mbib_gml_factory, mbib_gml, GML_METHODS["mbib-gml"][2],
                    task=partial(GMLTask, feature=GML_METHODS["mbib-gml"][1]), recipe=GML_RECIPE,
                    config_names=GML_CONFIG)


def build_gml_model(name: str, num_classes: int, method: str = "gml", teacher: nn.Module | None = None,
                    momentum: float = 0.999, **options) -> GMLWrapper:
    """build_model with the head a GML method needs, wrapped in a GMLWrapper (momentum or teacher keys)."""
    if method not in GML_METHODS:
        raise ConfigError(f"unknown GML method '{method}'; use one of {sorted(GML_METHODS)}")
    head, feature, defaults = GML_METHODS[method]
    options = {"head": head, **defaults, **options}
    return GMLWrapper(build_model(name, num_classes, **options), feature=feature, momentum=momentum, teacher=teacher)


register_gml_methods()
