import math

import pytest
import torch

import mbib.metrics as metrics
from mbib.metrics import (grouped_representation_ratio, mean_positive_posterior, per_class_accuracy,
                          representation_ratio, shot_accuracy, shot_groups)

# Class 0: (0,0),(3,4) (distance 5); class 1: (10,0),(10,2) (distance 2); class 2: the single point (0,10).
POINTS = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 2.0], [0.0, 10.0]])
LABELS = torch.tensor([0, 0, 1, 1, 2])
D01, D02, D12 = math.sqrt(8.5**2 + 1), math.sqrt(1.5**2 + 8**2), math.sqrt(10**2 + 9**2)  # centre distances


def test_representation_ratio_two_classes_by_hand():
    r = representation_ratio(POINTS[:4], LABELS[:4])
    assert r["d_intra"] == pytest.approx(((0 + 5 + 5 + 0) / 4 + (0 + 2 + 2 + 0) / 4) / 2)  # j=k zeros counted
    assert r["d_inter"] == pytest.approx(D01)
    assert r["rho"] == pytest.approx(1.75 / D01)


def test_representation_ratio_three_classes_and_restriction():
    r = representation_ratio(POINTS, LABELS)
    assert r["d_intra"] == pytest.approx(3.5 / 3)
    assert r["d_inter"] == pytest.approx((D01 + D02 + D12) / 3)
    head = representation_ratio(POINTS, LABELS, torch.tensor([True, True, False]))
    assert head["d_intra"] == pytest.approx(1.75)
    assert head["d_inter"] == pytest.approx((D01 + D02 + D01 + D12) / 4)  # rows {0,1}, columns all others
    tail = representation_ratio(POINTS, LABELS, torch.tensor([2]))
    assert tail["d_intra"] == 0.0 and tail["d_inter"] == pytest.approx((D02 + D12) / 2) and tail["rho"] == 0.0


def test_representation_ratio_matches_brute_force_with_chunking(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK", 3)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 5, generator=gen)
    labels = torch.randint(0, 4, (40,), generator=gen)
    intra, centres = [], []
    for c in range(4):
        r = feats[labels == c].double()
        intra.append(sum((a - b).norm() for a in r for b in r) / len(r) ** 2)
        centres.append(r.mean(0))
    inter = sum((centres[i] - centres[j]).norm() for i in range(4) for j in range(4) if i != j) / 12
    got = representation_ratio(feats, labels)
    assert got["d_intra"] == pytest.approx(float(sum(intra) / 4), rel=1e-9)
    assert got["d_inter"] == pytest.approx(float(inter), rel=1e-9)


def test_grouped_representation_ratio_uses_shot_groups():
    got = grouped_representation_ratio(POINTS, LABELS, class_counts=[300, 50, 3])
    assert got["all"] == representation_ratio(POINTS, LABELS)
    assert got["few"]["d_inter"] == pytest.approx((D02 + D12) / 2)
    assert got["many"]["d_intra"] == pytest.approx(2.5)


def test_shot_groups_boundaries():
    groups = shot_groups([101, 100, 20, 19])
    assert groups["many"].tolist() == [True, False, False, False]
    assert groups["medium"].tolist() == [False, True, True, False]
    assert groups["few"].tolist() == [False, False, False, True]


def test_shot_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0, 0, 0])
    acc = shot_accuracy(preds, labels, class_counts=[150, 50, 5])
    assert acc == pytest.approx({"overall": 50.0, "many": 75.0, "medium": 50.0, "few": 25.0})
    logits = torch.nn.functional.one_hot(preds, 3).float()
    assert shot_accuracy(logits, labels, [150, 50, 5]) == acc  # logits are argmax'd


def test_shot_accuracy_empty_group_is_nan_and_absent_class_ignored():
    acc = shot_accuracy(torch.tensor([0, 1]), torch.tensor([0, 0]), class_counts=[500, 400])
    assert acc["many"] == 50.0 and math.isnan(acc["medium"]) and math.isnan(acc["few"])
    per_class = per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    assert per_class[0] == 50.0 and per_class[1].isnan()


def test_mean_positive_posterior_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1, 0])
    got = mean_positive_posterior(probs, labels, 3)
    assert got[:2].tolist() == pytest.approx([(0.9 + 0.6 + 0.5) / 3, 0.7])
    assert got[2].isnan()


def test_prediction_share_counts_predictions_per_shot_group():
    from mbib.metrics import prediction_share

    counts = [200, 150, 50, 30, 10]  # many: classes 0-1, medium: 2-3, few: 4
    preds = torch.tensor([0, 0, 1, 2, 4, 4, 4, 3])
    share = prediction_share(preds, counts)
    assert share == pytest.approx({"many": 37.5, "medium": 25.0, "few": 37.5})
    logits = torch.nn.functional.one_hot(preds, 5).float()  # logits are reduced by argmax
    assert prediction_share(logits, counts) == share
