"""The logit-adjusted loss ("la", Menon et al. 2021) against values worked out by hand, and its registration."""

import math

import pytest
import torch
import torch.nn.functional as F

from mbib.methods import METHOD_MODEL_OPTIONS, METHODS, Task, build_criterion, method_task


@pytest.mark.parametrize("tau", [0.0, 1.0, 2.0])
def test_loss_matches_the_hand_value(tau):
    # counts 3:1 give priors 3/4 and 1/4; logits (1, 0) with label 0: the adjusted scores are 1 + tau log 3/4 and
    # tau log 1/4, so softmax gives class 0 the probability 1 / (1 + e^-1 3^-tau), and the loss is its -log
    loss, terms = build_criterion("la", [3, 1], tau=tau)({"v3": torch.tensor([[1.0, 0.0]])}, torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1) / 3**tau), abs=1e-6)  # float32 logsumexp
    assert set(terms) == {"la_v3", "total"}


def test_tau_zero_is_plain_cross_entropy_and_the_default_is_one():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 0])
    plain, _ = build_criterion("la", [30, 10, 1], tau=0.0)({"v3": logits}, labels)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    default, _ = build_criterion("la", [3, 1])({"v3": torch.tensor([[1.0, 0.0]])}, torch.tensor([0]))
    assert default.item() == pytest.approx(math.log(1 + math.exp(-1) / 3), rel=1e-6)


def test_la_is_a_registered_plain_classification_method():
    assert METHODS["la"] == "plain" and METHOD_MODEL_OPTIONS["la"] == {"head": "plain"}
    assert method_task("la") is Task
