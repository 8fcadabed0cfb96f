"""Losses: hand-computed values on K=3, B=2 (plain python math), gradients, switches and every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mbib.errors import ConfigError
from mbib.losses import (
    balanced_ce,
    bib_loss,
    bib_loss_terms,
    bib_pairs,
    class_constants,
    class_weights,
    drw_weights,
    ldam_margins,
    mbib_loss,
    mbib_loss_terms,
    tap_weights,
    temperatures,
    vsd_loss,
)
from mbib.methods import METHOD_MODEL_OPTIONS, METHODS, build_criterion, method_defaults, register_method, registry
from mbib.methods.single_head import SingleHeadCriterion

COUNTS = [100, 20, 5]
V = [[1.0, 0.5, -0.5], [0.2, 0.1, 0.3]]
Z = [[0.3, -0.2, 0.8], [-1.0, 0.4, 0.0]]
Y = [0, 2]


# ---------- plain-python references ----------
def log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(x - mx) for x in row))
    return [x - lse for x in row]


def hand_weights(counts, m):
    inv = [(1.0 / c) ** m for c in counts]
    return [len(counts) * x / sum(inv) for x in inv]


def hand_nll(logits, counts, adjust=True):
    rows = []
    for row, y in zip(logits, Y):
        adj = [x + (math.log(c) if adjust else 0.0) for x, c in zip(row, counts)]
        rows.append(-log_softmax(adj)[y])
    return rows


def hand_bsc(logits, counts, m, mean="weights"):
    w = hand_weights(counts, m)
    nll = hand_nll(logits, counts)
    num = sum(w[y] * l for y, l in zip(Y, nll))
    return num / sum(w[y] for y in Y) if mean == "weights" else num / len(Y)


def hand_temps(counts, gamma):
    return [(max(counts) / c) ** gamma for c in counts]


def hand_kl(teacher, student, temps):
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        lp = log_softmax([x / t for x, t in zip(t_row, temps)])
        lq = log_softmax([x / t for x, t in zip(s_row, temps)])
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    return total / len(teacher)


def t(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


LABELS = torch.tensor(Y)
LABELS4 = torch.tensor([0, 1, 2, 2])


# ---------- Eq. 7 weights, temperatures ----------
def test_class_weights_match_eq7_by_hand():
    got = class_weights(torch.tensor(COUNTS, dtype=torch.float64), 0.1)
    assert got.tolist() == pytest.approx(hand_weights(COUNTS, 0.1), rel=1e-12)
    assert float(got.sum()) == pytest.approx(3.0)  # Eq. 7 normalises to K
    assert got[2] > got[1] > got[0]  # rarer class, larger weight


def test_counts_and_frequencies_give_identical_weights():
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    freqs = counts / counts.sum()
    for m in (0.0, 0.1, 0.7, 2.0):
        assert torch.allclose(class_weights(counts, m), class_weights(freqs, m), rtol=1e-12, atol=0)


def test_class_counts_accepted_as_list_ndarray_tensor():
    ref = class_constants(COUNTS, 0.1, 0.5)
    for form in (np.array(COUNTS), torch.tensor(COUNTS), tuple(COUNTS), np.array(COUNTS, dtype=np.float32)):
        c = class_constants(form, 0.1, 0.5)
        assert torch.equal(c.weights, ref.weights) and torch.equal(c.temperature, ref.temperature)
        assert torch.equal(c.log_prior, ref.log_prior)


def test_temperatures_by_hand():
    got = temperatures(torch.tensor(COUNTS, dtype=torch.float64), 0.5)
    assert got.tolist() == pytest.approx([1.0, math.sqrt(5.0), math.sqrt(20.0)], rel=1e-12)
    assert temperatures(torch.tensor(COUNTS, dtype=torch.float64), 0.0).tolist() == [1.0, 1.0, 1.0]


# ---------- BSC loss (Eq. 4-7) ----------
@pytest.mark.parametrize("mean", ["weights", "batch"])
def test_balanced_ce_by_hand(mean):
    got = balanced_ce(t(V), LABELS, class_constants(COUNTS, 0.1), mean)
    assert float(got) == pytest.approx(hand_bsc(V, COUNTS, 0.1, mean), rel=1e-6)


def test_weights_mean_is_appendix_j_cross_entropy_call():
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    w = class_weights(counts.double(), 0.1).float()
    appendix_j = F.cross_entropy(t(V) + counts.log(), LABELS, weight=w)
    got = balanced_ce(t(V), LABELS, class_constants(COUNTS, 0.1), "weights")
    assert torch.allclose(got, appendix_j, rtol=1e-6)


def test_weighted_mean_switches_differ_by_mean_batch_weight():
    consts = class_constants(COUNTS, 0.5)
    labels = torch.tensor([1, 2])  # classes 0 and 2 have mean Eq. 7 weight ~1 at m = 0.1: avoid that pair
    by_weights = float(balanced_ce(t(V), labels, consts, "weights"))
    by_batch = float(balanced_ce(t(V), labels, consts, "batch"))
    w = hand_weights(COUNTS, 0.5)
    mean_w = (w[1] + w[2]) / 2
    assert by_batch != pytest.approx(by_weights, rel=1e-2)
    assert by_batch == pytest.approx(by_weights * mean_w, rel=1e-6)  # sum(w l)/B = sum(w l)/sum(w) * mean(w)
    # they agree when all weights are 1 (m = 0) or the batch holds a single class
    flat = class_constants(COUNTS, 0.0)
    assert float(balanced_ce(t(V), LABELS, flat, "batch")) == pytest.approx(float(balanced_ce(t(V), LABELS, flat)))
    same = torch.tensor([2, 2])
    assert float(balanced_ce(t(V), same, consts, "batch")) != pytest.approx(float(balanced_ce(t(V), same, consts)))
    assert float(balanced_ce(t(V), same, consts, "batch")) == pytest.approx(
        float(balanced_ce(t(V), same, consts)) * w[2], rel=1e-6)


# ---------- VSD (Eq. 8) ----------
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_vsd_kl_by_hand(gamma):
    temps = torch.tensor(hand_temps(COUNTS, gamma))
    got = vsd_loss(t(V), t(Z), temps)
    assert float(got) == pytest.approx(hand_kl(V, Z, hand_temps(COUNTS, gamma)), rel=1e-5)
    assert float(vsd_loss(t(V), t(V), temps)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_vsd_on_adjusted_logits_by_hand(gamma):
    """vsd_logits="adjusted" (an investigation switch): KL between softmax((f + log n) / T) and softmax((g + log n) / T)."""
    crit = build_criterion("bib", COUNTS, gamma=gamma, vsd_logits="adjusted")
    _, terms = crit({"v3": t(V), "z": t(Z)}, LABELS)
    shift = lambda rows: [[x + math.log(c) for x, c in zip(row, COUNTS)] for row in rows]  # noqa: E731
    assert float(terms["vsd_v3"]) == pytest.approx(hand_kl(shift(V), shift(Z), hand_temps(COUNTS, gamma)), rel=1e-5)
    raw = build_criterion("bib", COUNTS, gamma=gamma)({"v3": t(V), "z": t(Z)}, LABELS)[1]
    assert abs(float(raw["vsd_v3"]) - float(terms["vsd_v3"])) > 1e-3  # unequal counts: the two differ
    assert float(raw["bsc_v3"]) == float(terms["bsc_v3"])  # the BSC terms do not depend on it


def test_temperature_changes_vsd():
    no_t = float(vsd_loss(t(V), t(Z), torch.ones(3)))
    with_t = float(vsd_loss(t(V), t(Z), torch.tensor(hand_temps(COUNTS, 0.5))))
    assert abs(no_t - with_t) > 1e-3


def test_vsd_gradient_reaches_student_only():
    v, z = t(V, grad=True), t(Z, grad=True)
    vsd_loss(v, z, torch.tensor(hand_temps(COUNTS, 0.5))).backward()
    assert v.grad is None or torch.count_nonzero(v.grad) == 0
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0


def test_bib_gradient_on_v_comes_from_bsc_only():
    v, z = t(V, grad=True), t(Z, grad=True)
    bib_loss(v, z, LABELS, COUNTS, beta=3.0, gamma=0.5).backward()
    v2 = t(V, grad=True)
    bib_loss_terms(v2, t(Z), LABELS, COUNTS, beta=3.0, gamma=0.5)["bsc_v"].backward()
    assert torch.allclose(v.grad, v2.grad, rtol=0, atol=1e-7)


def test_vsd_is_finite_when_teacher_probability_underflows():
    teacher = [[0.0, -1000.0, 0.0], [5.0, -900.0, 1.0]]
    got = vsd_loss(t(teacher), t(Z), torch.ones(3))
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(hand_kl(teacher, Z, [1.0, 1.0, 1.0]), rel=1e-5)
    p = F.softmax(t(teacher), dim=-1)
    assert torch.isnan((p * p.log()).sum())  # Appendix J's p_T * log(p_T) would be NaN here


# ---------- BIB (Eq. 9) ----------
def test_bib_loss_terms_by_hand():
    terms = bib_loss_terms(t(V), t(Z), LABELS, COUNTS, beta=2.0, m=0.1, gamma=0.5)
    bsc_v, bsc_z = hand_bsc(V, COUNTS, 0.1), hand_bsc(Z, COUNTS, 0.1)
    vsd = hand_kl(V, Z, hand_temps(COUNTS, 0.5))
    assert float(terms["bsc_v"]) == pytest.approx(bsc_v, rel=1e-6)
    assert float(terms["bsc_z"]) == pytest.approx(bsc_z, rel=1e-6)
    assert float(terms["vsd"]) == pytest.approx(vsd, rel=1e-5)
    assert float(terms["total"]) == pytest.approx(bsc_v + bsc_z + 2.0 * vsd, rel=1e-6)


def test_bib_without_logit_adjustment_is_plain_weighted_ce():
    terms = bib_loss_terms(t(V), t(Z), LABELS, COUNTS, beta=0.0, m=0.0, logit_adjust=False)
    assert float(terms["bsc_v"]) == pytest.approx(sum(hand_nll(V, COUNTS, adjust=False)) / 2, rel=1e-6)


@pytest.mark.parametrize("bad", [{"beta": -1.0}, {"m": -0.1}, {"gamma": -0.5}, {"beta": float("nan")}])
def test_negative_hyperparameters_raise_config_error(bad):
    args = {"beta": 1.0, **bad}
    with pytest.raises(ConfigError):
        bib_loss(t(V), t(Z), LABELS, COUNTS, **args)
    with pytest.raises(ConfigError):
        build_criterion("mbib", COUNTS, **bad)


# ---------- MBIB (Eq. 11) and its wirings ----------
def fake_outputs(keys, batch=4, k=3, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(batch, k, generator=g).requires_grad_(grad) for key in keys}


def test_mbib_with_a_b_zero_equals_bib_exactly():
    out = fake_outputs(["v1", "v2", "v3", "z"])
    labels = torch.tensor([0, 1, 2, 2])
    for gamma in (0.0, 0.5):
        got = mbib_loss(out, labels, COUNTS, a=0.0, b=0.0, beta=3.0, gamma=gamma)
        assert torch.equal(got, bib_loss(out["v3"], out["z"], labels, COUNTS, beta=3.0, gamma=gamma))


def test_mbib_is_weighted_sum_of_bibs():
    out = fake_outputs(["v1", "v2", "v3", "z"])
    labels = torch.tensor([0, 1, 2, 2])

    def bib(v, z):
        return float(bib_loss(out[v], out[z], labels, COUNTS, beta=2.0, gamma=0.5))

    got = float(mbib_loss(out, labels, COUNTS, a=0.1, b=0.3, beta=2.0, gamma=0.5))
    assert got == pytest.approx(0.1 * bib("v1", "z") + 0.3 * bib("v2", "z") + bib("v3", "z"), rel=1e-6)
    se = float(mbib_loss(out, labels, COUNTS, a=0.1, b=0.3, beta=2.0, gamma=0.5, wiring="se"))
    assert se == pytest.approx(0.1 * bib("v1", "v2") + 0.3 * bib("v2", "v3") + bib("v3", "z"), rel=1e-6)
    all_ = float(mbib_loss(out, labels, COUNTS, a=0.1, b=0.3, beta=2.0, gamma=0.5, wiring="all"))
    assert all_ == pytest.approx(got + 0.1 * bib("v1", "v2") + 0.3 * bib("v2", "v3"), rel=1e-6)


def test_input_tap_x_is_the_shallowest_observation_of_4_mbib_x():
    out = fake_outputs(["x", "v1", "v2", "v3", "z"])
    labels = torch.tensor([0, 1, 2, 2])

    def bib(v):
        return float(bib_loss(out[v], out["z"], labels, COUNTS, beta=2.0))

    got = float(mbib_loss(out, labels, COUNTS, a=0.3, b=0.3, beta=2.0))  # Table 4: a = b = 0.3
    assert got == pytest.approx(0.3 * (bib("x") + bib("v1") + bib("v2")) + bib("v3"), rel=1e-6)
    assert {"bsc_x", "bsc_z@x", "vsd_x"} <= set(mbib_loss_terms(out, labels, COUNTS))


def test_se_mbib_teacher_is_the_shallower_tap():
    out = fake_outputs(["v1", "v2", "v3", "z"], grad=True)
    terms = mbib_loss_terms(out, torch.tensor([0, 1, 2, 2]), COUNTS, wiring="se")
    terms["vsd_v1@v2"].backward()
    assert out["v1"].grad is None or torch.count_nonzero(out["v1"].grad) == 0
    assert torch.count_nonzero(out["v2"].grad) > 0


def test_tap_weights_generalise_eq11():
    assert tap_weights(3, 0.1, 0.3) == [0.1, 0.3, 1.0]
    assert tap_weights(5, 0.1, 0.3) == [0.1, 0.3, 0.3, 0.3, 1.0]
    assert tap_weights(2, 0.1, 0.3) == [0.3, 1.0]  # Table 4: 2-MBIB is 3-MBIB with a = 0
    assert tap_weights(1, 0.1, 0.3) == [1.0]
    assert bib_pairs(["v1", "v2", "v3"], 0.1, 0.3, "se") == [("v1", "v2", 0.1), ("v2", "v3", 0.3), ("v3", "z", 1.0)]
    assert len(bib_pairs(["v1", "v2", "v3"], 0.1, 0.3, "all")) == 5


def test_mbib_term_names_per_tap():
    out = fake_outputs(["v1", "v2", "v3", "v4", "z"])
    terms = mbib_loss_terms(out, torch.tensor([0, 1, 2, 2]), COUNTS)
    for tap in ("v1", "v2", "v3", "v4"):
        assert {f"bsc_{tap}", f"bsc_z@{tap}", f"vsd_{tap}"} <= set(terms)
    assert "total" in terms


# ---------- baselines ----------
def test_focal_by_hand_and_gamma_zero_is_ce():
    crit = build_criterion("focal", COUNTS)
    loss, _ = crit({"v3": t(V)}, LABELS)
    expected = 0.0
    for row, y in zip(V, Y):
        lp = log_softmax(row)[y]
        expected += -(1 - math.exp(lp)) * lp  # default focal_gamma = 1
    assert float(loss) == pytest.approx(expected / 2, rel=1e-6)
    ce, _ = build_criterion("focal", COUNTS, focal_gamma=0.0)({"v3": t(V)}, LABELS)
    assert float(ce) == pytest.approx(float(F.cross_entropy(t(V), LABELS)), rel=1e-6)


def test_bsce_is_ren_balanced_softmax():
    loss, _ = build_criterion("bsce", COUNTS)({"v3": t(V)}, LABELS)
    assert float(loss) == pytest.approx(sum(hand_nll(V, COUNTS)) / 2, rel=1e-6)
    mlp, terms = build_criterion("bsce-mlp", COUNTS)({"z": t(Z)}, LABELS)
    assert float(mlp) == pytest.approx(sum(hand_nll(Z, COUNTS)) / 2, rel=1e-6) and "bsce_z" in terms


def test_ldam_margins_and_drw_weights_by_hand():
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    margins = [0.5 * (5 / c) ** 0.25 for c in COUNTS]
    assert ldam_margins(counts).tolist() == pytest.approx(margins, rel=1e-12)
    eff = [(1 - 0.9999) / (1 - 0.9999 ** c) for c in COUNTS]
    assert drw_weights(counts).tolist() == pytest.approx([3 * e / sum(eff) for e in eff], rel=1e-9)
    assert drw_weights(counts, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_ldam_drw_switches_weights_at_defer_epoch():
    cos = [[0.9, 0.1, -0.2], [0.3, 0.2, 0.4]]
    margins = [0.5 * (5 / c) ** 0.25 for c in COUNTS]
    nll = []
    for row, y in zip(cos, Y):
        adj = [30.0 * (x - (margins[y] if j == y else 0.0)) for j, x in enumerate(row)]
        nll.append(-log_softmax(adj)[y])
    eff = [(1 - 0.9999) / (1 - 0.9999 ** c) for c in COUNTS]
    w = [3 * e / sum(eff) for e in eff]
    crit = build_criterion("ldam-drw", COUNTS, drw_epoch=160)
    crit.set_epoch(159)
    before, _ = crit({"v3": t(cos)}, LABELS)
    assert float(before) == pytest.approx(sum(nll) / 2, rel=1e-5)
    crit.set_epoch(160)
    after, _ = crit({"v3": t(cos)}, LABELS)
    weighted = (w[Y[0]] * nll[0] + w[Y[1]] * nll[1]) / (w[Y[0]] + w[Y[1]])
    assert float(after) == pytest.approx(weighted, rel=1e-5)
    assert abs(float(after) - float(before)) > 1e-3
    assert METHOD_MODEL_OPTIONS["ldam-drw"] == {"head": "plain", "normed": True}


def test_appendix_b_ablations():
    v, z = t(V), t(Z)
    ce2, _ = build_criterion("ce-2branch", COUNTS, beta=4.0)({"v3": v, "z": z}, LABELS)  # beta ignored: fixed 0
    assert float(ce2) == pytest.approx(float(F.cross_entropy(v, LABELS) + F.cross_entropy(z, LABELS)), rel=1e-6)
    sd, _ = build_criterion("sdib", COUNTS, beta=2.0)({"v3": v, "z": z}, LABELS)
    assert float(sd) == pytest.approx(float(ce2) + 2.0 * hand_kl(V, Z, [1.0, 1.0, 1.0]), rel=1e-6)
    b2, _ = build_criterion("bsce-2branch", COUNTS)({"v3": v, "z": z}, LABELS)
    assert float(b2) == pytest.approx(hand_bsc(V, COUNTS, 0.1) + hand_bsc(Z, COUNTS, 0.1), rel=1e-6)


# ---------- criteria and registry ----------
HEAD_KEYS = {"plain": ["v3"], "bib": ["v3", "z"], "mbib": ["v1", "v2", "v3", "z"], "mlp": ["z"]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_its_head(method):
    keys = HEAD_KEYS[METHODS[method]]
    out = fake_outputs(keys, batch=6, k=3, grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    crit = build_criterion(method, COUNTS)
    crit.set_epoch(199)  # LDAM-DRW past its defer epoch: the weighted branch runs too
    loss, terms = crit(out, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(terms["total"], loss.detach())
    assert all(not v.requires_grad for v in terms.values())
    loss.backward()
    for key in keys:
        grad = out[key].grad
        assert grad is not None and torch.isfinite(grad).all() and torch.count_nonzero(grad) > 0, key


def test_criterion_matches_functional_and_caches_constants():
    out = fake_outputs(["v1", "v2", "v3", "z"])
    labels = torch.tensor([0, 1, 2, 2])
    crit = build_criterion("mbib", COUNTS, beta=2.0, gamma=0.5)
    loss, terms = crit(out, labels)
    assert torch.equal(loss, mbib_loss(out, labels, COUNTS, a=0.1, b=0.3, beta=2.0, gamma=0.5))
    assert {"bsc_v1", "bsc_z@v1", "vsd_v1", "vsd_v3"} <= set(terms)
    assert {"log_prior", "weights", "temperature"} <= {name for name, _ in crit.named_buffers()}
    assert crit.state_dict() == {}  # derived from class_counts, nothing to checkpoint
    half, _ = crit({k: v.half() for k, v in out.items()}, labels)
    assert half.dtype == torch.float32


def test_defaults_follow_the_paper():
    assert method_defaults("mbib") == {"beta": 5.0, "m": 0.1, "gamma": 0.0, "weighted_mean": "weights",
                                       "logit_adjust": True, "vsd_logits": "raw", "a": 0.1, "b": 0.3,
                                       "detach_shallow": True}
    assert method_defaults("ldam-drw")["drw_epoch"] == 160


@pytest.mark.parametrize("call, message", [
    (lambda: build_criterion("nope", COUNTS), "unknown loss method"),
    (lambda: build_criterion("bib", COUNTS, betta=1.0), "unknown loss hyperparameter"),
    (lambda: build_criterion("bib", [10, 0, 3]), "positive"),
    (lambda: build_criterion("bib", [[10, 3]]), "1-D"),
    (lambda: build_criterion("bib", COUNTS, weighted_mean="sum"), "weighted_mean"),
    (lambda: build_criterion("bib", COUNTS, logit_adjust="yes"), "logit_adjust"),
    (lambda: build_criterion("ldam-drw", COUNTS, drw_beta=1.0), "drw_beta"),
    (lambda: build_criterion("ldam-drw", COUNTS, drw_epoch=1.5), "drw_epoch"),
    (lambda: build_criterion("mbib", COUNTS)(fake_outputs(["v3", "z"]), LABELS4), "head='mbib'"),
    (lambda: build_criterion("bib", COUNTS)(fake_outputs(["v3"]), LABELS4), "head='bib'"),
    (lambda: build_criterion("bsce-mlp", COUNTS)(fake_outputs(["v3"]), LABELS4), "head='mlp'"),
    (lambda: build_criterion("ce", COUNTS)(fake_outputs(["v3"], k=5), LABELS4), "num_classes"),
])
def test_config_errors_are_one_liners(call, message):
    with pytest.raises(ConfigError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_register_method_adds_a_method():
    def factory(class_counts, scale_ce=1.0):
        return SingleHeadCriterion("twice-ce", "bib", class_counts, kind="ce")

    register_method("twice-ce", "bib", factory, {"scale_ce": 1.0})
    try:
        assert METHODS["twice-ce"] == "bib" and METHOD_MODEL_OPTIONS["twice-ce"] == {"head": "bib"}
        loss, _ = build_criterion("twice-ce", COUNTS, scale_ce=2.0, beta=1.0)({"v3": t(V), "z": t(Z)}, LABELS)
        assert float(loss) == pytest.approx(float(F.cross_entropy(t(V), LABELS)), rel=1e-6)
        with pytest.raises(ConfigError):
            register_method("twice-ce", "bib", lambda c: None)
        with pytest.raises(ConfigError):
            register_method("bad-head", "tree", factory)
    finally:
        for table in (registry._SPECS, METHODS, METHOD_MODEL_OPTIONS):
            table.pop("twice-ce", None)
