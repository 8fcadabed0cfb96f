"""The investigation's switches (issue: settle MBIB on CIFAR-100-LT): the normalised neck, undetached shallow
teachers, logit adjustment off, Nesterov momentum. Each is off by default and changes exactly what it names."""

from __future__ import annotations

import pytest
import torch

from mbib.checkpoint import save_checkpoint
from mbib.config import TrainConfig, apply_overrides
from mbib.errors import ConfigError
from mbib.export import export_onnx
from mbib.methods import build_criterion
from mbib.models import build_model
from mbib.train.build import build_task, model_spec
from mbib.train.engine import Engine, load_data

COUNTS = torch.tensor([500.0, 200, 80, 30, 10])


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("neck", ["bn", "bn-post"])
def test_neck_brings_resnet32_mbib_to_table6s_486_02k(neck):
    # 485,664 without it + BN1d on v1, v2, v3 and z: (16 + 32 + 64 + 64) x 2 = 352
    assert n_params(build_model("resnet32", 100, neck=neck)) == 486_016
    assert n_params(build_model("resnet32", 100)) == 485_664


def test_bn_neck_feeds_z_the_raw_observation_and_bn_post_the_normalised_one():
    x = torch.randn(8, 3, 32, 32)
    for neck, z_reaches_v3_bn in (("bn", False), ("bn-post", True)):
        torch.manual_seed(0)
        model = build_model("resnet32", 10, neck=neck)
        assert isinstance(model.z_fc[1], torch.nn.BatchNorm1d)  # Linear -> BN -> ReLU
        model(x)["z"].square().sum().backward()
        grad = model.necks["v3"].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == z_reaches_v3_bn
    # the classifiers read the normalised observations: in train mode each is zero-mean per feature over the batch
    model = build_model("resnet32", 10, neck="bn")
    feats = model.features(x)
    for key in ("v1", "v2", "v3"):
        assert feats[key].mean(dim=0).abs().max() < 1e-4


def test_plain_head_gets_one_bn_and_config_reaches_the_model():
    assert list(build_model("resnet32", 10, head="plain", neck="bn").necks) == ["v3"]
    cfg = apply_overrides(TrainConfig(), {"model.neck": "bn-post", "loss.method": "bsce"})
    assert model_spec(cfg, 10)["options"] == {"head": "plain", "num_taps": 3, "neck": "bn-post"}
    assert "neck" not in model_spec(TrainConfig(), 10)["options"]  # old checkpoints keep their spec
    with pytest.raises(ConfigError, match="model.neck must be"):
        apply_overrides(TrainConfig(), {"model.neck": "batchnorm"})


def test_neck_model_exports_to_onnx_with_parity(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet32", 10, neck="bn")
    with torch.no_grad():  # non-trivial running statistics, so a BN ignored at inference would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    state = {"model": model.state_dict(),
             "model_spec": {"name": "resnet32", "num_classes": 10, "options": {"head": "mbib", "neck": "bn"}},
             "data_spec": {"dataset": "digits-lt", "classes": [str(i) for i in range(10)], "mean": [0.5] * 3,
                           "std": [0.25] * 3, "image_size": 32, "class_counts": [10] * 10}}
    ckpt = save_checkpoint(state, tmp_path / "run")
    report = export_onnx(ckpt, tmp_path / "neck.onnx", synthetic_parity=True, parity_count=8)
    assert report["passed"] and report["top1_agreement"] == 1.0


def vsd_grads(detach_shallow: bool) -> dict[str, bool]:
    """Which heads the VSD terms alone send gradient to."""
    torch.manual_seed(0)
    model = build_model("resnet32", 5)
    criterion = build_criterion("mbib", COUNTS, detach_shallow=detach_shallow)
    vsd = criterion.loss_terms(model(torch.randn(6, 3, 32, 32)), torch.tensor([0, 1, 2, 3, 4, 0]))
    (vsd["vsd_v1"] + vsd["vsd_v2"] + vsd["vsd_v3"]).backward()
    return {k: model.heads[k].weight.grad is not None and bool(model.heads[k].weight.grad.abs().sum() > 0)
            for k in ("v1", "v2", "v3", "z")}


def test_shallow_teachers_get_vsd_gradient_only_when_undetached():
    assert vsd_grads(True) == {"v1": False, "v2": False, "v3": False, "z": True}  # Appendix J: every teacher detached
    assert vsd_grads(False) == {"v1": True, "v2": True, "v3": False, "z": True}  # the final observation stays detached


def test_undetached_teachers_change_gradients_not_the_loss_value():
    torch.manual_seed(0)
    outputs = {k: torch.randn(6, 5) for k in ("v1", "v2", "v3", "z")}
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    a = build_criterion("mbib", COUNTS).loss_terms(outputs, labels)
    b = build_criterion("mbib", COUNTS, detach_shallow=False).loss_terms(outputs, labels)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="detach_shallow"):
        build_criterion("mbib", COUNTS, detach_shallow="no")


def test_table9_rows_are_settings():
    """Table 9: m = 0 (Eq. 7 weights all 1), no logit adjustment (Eq. 4 off), and neither."""
    def criterion(overrides):
        cfg = apply_overrides(TrainConfig(), overrides)
        return build_task(cfg, model_spec(cfg, 5), COUNTS).criterion

    full = criterion({})
    assert torch.allclose(full.log_prior, COUNTS.log()) and not torch.allclose(full.weights, torch.ones(5))
    no_m = criterion({"loss.m": 0})
    assert torch.equal(no_m.weights, torch.ones(5)) and torch.allclose(no_m.log_prior, COUNTS.log())
    no_la = criterion({"loss.logit_adjust": "false"})
    assert torch.equal(no_la.log_prior, torch.zeros(5)) and torch.allclose(no_la.weights, full.weights)
    neither = criterion({"loss.m": 0, "loss.logit_adjust": "false"})
    assert torch.equal(neither.weights, torch.ones(5)) and torch.equal(neither.log_prior, torch.zeros(5))
    assert criterion({"loss.detach_shallow": "false"}).detach_shallow is False


def test_nesterov_reaches_the_optimiser_and_changes_the_step():
    def step(nesterov: bool):
        cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                              "optim.batch_size": 64, "optim.warmup_epochs": 0,
                                              "optim.nesterov": nesterov, "runtime.amp": False,
                                              "runtime.compile": False})
        engine = Engine(cfg, load_data(cfg), torch.device("cpu"))
        assert all(g["nesterov"] is nesterov for g in engine.optimizer.param_groups)
        batches = iter(engine.epoch_batches(0))
        for _ in range(2):  # momentum buffers exist from the second step on: there the two rules differ
            engine.train_step(next(batches))
        return torch.cat([p.detach().flatten() for p in engine.task.train_module.parameters()])

    assert not torch.allclose(step(True), step(False))
    with pytest.raises(ConfigError, match="nesterov needs"):
        apply_overrides(TrainConfig(), {"optim.nesterov": True, "optim.momentum": 0})
