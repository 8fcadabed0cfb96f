"""The selection split: a fixed, stratified part of the balanced test set that chooses epochs and trials, so the
rest (the held-out part) reports a number that no choice has looked at.

Picking a run's best epoch or a study's best trial by test accuracy and reporting that accuracy overstates it
(the paper's practice); with data.selection_split = 0.5 half of each class's test images select and the other
half report. 0 turns it off: the whole test set selects, as the paper did, and no held-out number exists.
"""

from __future__ import annotations

import torch

SELECT_METRIC = "select_acc"  # what chooses: the selection split's accuracy (the whole test set's when it is off)
HELDOUT = ("heldout_acc", "heldout_many", "heldout_medium", "heldout_few")  # what reports, at the chosen epoch


def test_labels(data) -> torch.Tensor:
    """The test labels in the order the data source yields them (in-memory tensors or a file list's labels)."""
    if hasattr(data, "y_test"):
        return torch.as_tensor(data.y_test)
    return torch.as_tensor(list(data.test.labels), dtype=torch.int64)


def selection_mask(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Boolean [N]: True for the test images that select. Per class, a seeded shuffle of its images keeps
    round(fraction * n_c) of them (half of each class at 0.5, so both parts stay balanced); 0 selects all."""
    labels = torch.as_tensor(labels)
    if fraction <= 0:
        return torch.ones(len(labels), dtype=torch.bool)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for cls in torch.unique(labels).tolist():  # classes in label order: the same draw for the same labels and seed
        idx = torch.nonzero(labels == cls).flatten()
        keep = int(len(idx) * fraction + 0.5)  # half up: a 1-image class selects with it at 0.5
        mask[idx[torch.randperm(len(idx), generator=g)[:keep]]] = True
    return mask


def describe_split(fraction: float, seed: int) -> tuple[str, str]:
    """(what selected, what reports), in words for summaries and MLflow tags."""
    if fraction <= 0:
        return ("the whole test set (data.selection_split=0: selection and report share it, an optimistic number)",
                "the whole test set")
    return (f"the selection split: {fraction:.0%} of each class's test images (data.selection_seed={seed})",
            f"the held-out split: the other {1 - fraction:.0%}")
