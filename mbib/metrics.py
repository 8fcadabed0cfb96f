"""Evaluation metrics: many/medium/few-shot accuracy, mean positive posterior (Eq. 14), rho (Eq. 15-17).

Shot groups follow Liu et al. (2019): many > 100 training images, medium 20..100, few < 20. A group's
accuracy is the mean of its classes' accuracies (as in Liu et al.'s shot_acc); on a balanced test set that
equals the accuracy over the group's test images. Classes without test images are left out of averages.
"""

from __future__ import annotations

import torch

CHUNK = 1024  # rows of a distance matrix computed at once, bounding memory to CHUNK x n doubles


def shot_groups(class_counts, many: int = 100, few: int = 20) -> dict[str, torch.Tensor]:
    """Boolean masks [K] over classes: many (> many), medium (few..many), few (< few) training images."""
    counts = torch.as_tensor(class_counts)
    return {"many": counts > many, "medium": (counts >= few) & (counts <= many), "few": counts < few}


def per_class_accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 accuracy of each class in percent [K] (NaN where a class has no test images).

    preds are predicted labels [N] or logits/probabilities [N,K] (argmax taken)."""
    preds = _labels_of(preds).to(labels.device)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    return (100.0 * correct / total).float()  # 0/0 -> NaN for absent classes


def shot_accuracy(preds: torch.Tensor, labels: torch.Tensor, class_counts, many: int = 100,
                  few: int = 20) -> dict[str, float]:
    """Overall top-1 accuracy over all test images and the many/medium/few-shot accuracies, in percent."""
    preds = _labels_of(preds).to(labels.device)
    per_class = per_class_accuracy(preds, labels, len(class_counts)).cpu()
    result = {"overall": 100.0 * (preds == labels).double().mean().item()}
    for group, mask in shot_groups(class_counts, many, few).items():
        values = per_class[mask]
        values = values[~values.isnan()]
        result[group] = values.mean().item() if len(values) else float("nan")
    return result


def mean_positive_posterior(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """q̄(y_i|x) [K]: mean over class-i test images of the probability given to class i (NaN if none)."""
    positive = probs.gather(1, labels[:, None]).squeeze(1).double()
    total = torch.zeros(num_classes, dtype=torch.float64, device=probs.device).index_add_(0, labels, positive)
    counts = torch.bincount(labels, minlength=num_classes).double()
    return (total / counts).float()  # Eq. 14: (1/n_i) sum_j q(y_i|x_j)


def representation_ratio(features: torch.Tensor, labels: torch.Tensor,
                         classes: torch.Tensor | None = None) -> dict[str, float]:
    """D_intra, D_inter and rho = D_intra / D_inter of representations [N,D] (Eq. 15-17).

    `classes` (a boolean mask [K] or class indices) restricts the outer sums over i of Eq. 15 and 16 to
    those classes; the j of Eq. 16 still runs over every other class present, so a group's D_inter is how
    far its centres lie from all other centres. Without it (or with all classes) this is exactly Eq. 15-17.
    """
    feats = features.detach().flatten(1).double()
    labels = labels.to(feats.device)
    present = torch.unique(labels)
    members = [feats[labels == c] for c in present.tolist()]
    centres = torch.stack([m.mean(0) for m in members])  # c_i = mean of R_i
    chosen = torch.ones(len(present), dtype=torch.bool, device=feats.device)
    if classes is not None:
        classes = torch.as_tensor(classes, device=feats.device)
        wanted = classes.nonzero().flatten() if classes.dtype == torch.bool else classes.long()
        chosen = torch.isin(present, wanted)
    if not chosen.any():
        return {"d_intra": float("nan"), "d_inter": float("nan"), "rho": float("nan")}
    # Eq. 15: (1/|R_i|^2) sum_{j,k} ||r_j - r_k||, j = k terms (zero) included, averaged over classes i
    intra = torch.stack([_sum_cdist(m, m) / len(m) ** 2 for m, keep in zip(members, chosen.tolist()) if keep])
    d_intra = intra.mean().item()
    k = len(present)
    # Eq. 16: mean of ||c_i - c_j|| over ordered pairs i != j (the i = j terms are zero)
    d_inter = (_sum_cdist(centres[chosen], centres) / (int(chosen.sum()) * (k - 1))).item() if k > 1 else float("nan")
    rho = d_intra / d_inter if d_inter > 0 else float("nan")  # Eq. 17 (undefined without separated centres)
    return {"d_intra": d_intra, "d_inter": d_inter, "rho": rho}


def grouped_representation_ratio(features: torch.Tensor, labels: torch.Tensor, class_counts, many: int = 100,
                                 few: int = 20) -> dict[str, dict[str, float]]:
    """rho per shot group and for all classes, as in Table 5 (see representation_ratio for the restriction)."""
    result = {group: representation_ratio(features, labels, mask)
              for group, mask in shot_groups(class_counts, many, few).items()}
    result["all"] = representation_ratio(features, labels)
    return result


def prediction_share(preds: torch.Tensor, class_counts, many: int = 100, few: int = 20) -> dict[str, float]:
    """Percent of predictions that name a class of each shot group. On a balanced test set a classifier without
    a lean to the head gives each group its share of the classes (35% many-shot on CIFAR-100-LT at IF 100)."""
    pred = _labels_of(preds)
    return {group: 100.0 * mask[pred].float().mean().item() for group, mask in shot_groups(class_counts, many, few).items()}


def _sum_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of all pairwise L2 distances between rows of a and rows of b, CHUNK rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, len(a), CHUNK):
        total += torch.cdist(a[start:start + CHUNK], b).sum()
    return total


def _labels_of(preds: torch.Tensor) -> torch.Tensor:
    return preds.argmax(dim=1) if preds.dim() == 2 else preds
