"""Configuration presets (Section 4.2), overrides and the learning-rate schedule."""

import pytest
import torch

from mbib.config import TrainConfig, apply_overrides, preset, resolve_config, scale_epochs
from mbib.errors import ConfigError
from mbib.train.build import build_task, loss_settings, model_spec
from mbib.train.engine import DeviceOptions, device_options
from mbib.train.schedule import lr_factor


def test_cifar_preset_is_section_4_2():
    c = preset("cifar100-lt")
    assert (c.model.arch, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == ("resnet32", 0.1, 0.9, 3e-4)
    assert (c.optim.batch_size, c.optim.epochs, c.optim.warmup_epochs) == (128, 200, 5)
    assert c.optim.milestones == (160, 180) and c.optim.milestone_factors == (0.01, 0.0001)
    got = loss_settings(c)  # the loss settings come from the method's registry entry unless the config sets them
    assert (got["beta"], got["a"], got["b"], got["m"], got["gamma"], got["weighted_mean"]) == (5.0, 0.1, 0.3, 0.1, 0.0, "weights")


@pytest.mark.parametrize("method,m", [("bsce", 0.0), ("bsce-mlp", 0.0), ("bib", 0.1), ("mbib", 0.1), ("ce", None)])
def test_each_method_keeps_its_own_default(method, m):
    """The bug this guards: the config's m = 0.1 used to reach BSCE, giving Ren et al.'s loss Eq. 7's weights."""
    cfg = apply_overrides(preset("cifar100-lt"), {"loss.method": method})
    assert loss_settings(cfg)["m"] == m
    if m is not None:
        crit = build_task(cfg, model_spec(cfg, 3), [500, 100, 10]).criterion
        assert (crit.weights.max() - crit.weights.min() > 0.1) == (m > 0)  # Eq. 7 weights differ only when m > 0


def test_a_set_value_reaches_every_method_that_takes_it():
    for method, key, value, attr in [("bsce", "m", 0.2, None), ("focal", "focal_gamma", 2.0, "focal_gamma"),
                                     ("la", "tau", 0.5, "tau"), ("mbib", "weighted_mean", "batch", "weighted_mean")]:
        cfg = apply_overrides(preset("cifar100-lt"), {"loss.method": method, f"loss.{key}": value})
        assert loss_settings(cfg)[key] == value
        crit = build_task(cfg, model_spec(cfg, 3), [500, 100, 10]).criterion
        if attr:
            assert getattr(crit, attr) == value
        else:  # m = 0.2: Eq. 7 weights (n_max / n_i)^0.2 up to a common factor
            assert crit.weights[2] / crit.weights[0] == pytest.approx(50 ** 0.2, rel=1e-5)
    with pytest.raises(ConfigError, match="focal_gamma and tau must be >= 0"):
        apply_overrides(TrainConfig(), {"loss.tau": -1})


@pytest.mark.parametrize("name,arch,lr,batch,wd,epochs", [
    ("imagenet-lt", "resnet10", 0.05, 128, 5e-4, 90),
    ("imagenet-lt-resnext50", "resnext50_32x4d", 0.025, 64, 5e-4, 90),
    ("inat2018", "resnet50", 0.025, 64, 1e-4, 90),
    ("inat2018-200ep", "resnet50", 0.025, 64, 1e-4, 200),
])
def test_large_presets(name, arch, lr, batch, wd, epochs):
    c = preset(name)
    assert (c.model.arch, c.optim.lr, c.optim.batch_size, c.optim.weight_decay, c.optim.epochs) == \
        (arch, lr, batch, wd, epochs)
    assert c.optim.schedule == "cosine" and c.loss.gamma == 0.5 and loss_settings(c)["gamma"] == 0.5


def test_overrides_are_typed_and_checked():
    c = apply_overrides(TrainConfig(), {"optim.lr": "0.05", "loss.beta": "3", "optim.milestones": "10,20",
                                        "runtime.use_gpu": "false", "data.limit_train": "none"})
    assert c.optim.lr == 0.05 and c.loss.beta == 3.0 and c.optim.milestones == (10, 20)
    assert c.runtime.use_gpu is False and c.data.limit_train is None
    assert TrainConfig().optim.lr == 0.1  # the original is untouched
    with pytest.raises(ConfigError, match="unknown setting 'optim.lrr'"):
        apply_overrides(TrainConfig(), {"optim.lrr": 1})
    with pytest.raises(ConfigError, match="bad value 'abc' for optim.epochs"):
        apply_overrides(TrainConfig(), {"optim.epochs": "abc"})
    with pytest.raises(ConfigError, match="beta"):
        apply_overrides(TrainConfig(), {"loss.beta": -1})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("cifar1000")


@pytest.mark.parametrize("key,value,message", [
    ("optim.epochs", 0, "optim.epochs must be >= 1"),
    ("optim.batch_size", 0, "optim.batch_size must be >= 1"),
    ("data.imbalance_factor", 0.5, "data.imbalance_factor must be >= 1"),
    ("runtime.eval_every", 0, "runtime.eval_every must be >= 1"),
    ("runtime.num_workers", 0, "runtime.num_workers must be >= 1"),
    ("optim.lr", 0, "optim.lr must be > 0"),
    ("optim.lr", "nan", "optim.lr=nan is not a finite number"),
    ("loss.beta", "inf", "loss.beta=inf is not a finite number"),
    ("optim.milestone_factors", "0.1,nan", "optim.milestone_factors=nan is not a finite number"),
    ("data", "x", "'data' is a section, not a setting"),
    ("optim", 1, "'optim' is a section, not a setting"),
    ("foo.bar", 1, "unknown setting 'foo.bar'"),
    ("foo", 1, "unknown setting 'foo'"),
    ("data.dataset.x", 1, "unknown setting 'data.dataset.x'"),
])
def test_bad_settings_are_one_line_config_errors(key, value, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), {key: value})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_roundtrip_through_dict():
    c = apply_overrides(TrainConfig(), {"loss.method": "bib", "optim.milestones": (3, 4)})
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_step_schedule_values():
    o = preset("cifar100-lt").optim
    # linear warm-up over 5 epochs, then x0.01 from epoch 160 and x0.0001 from 180 (Cao et al.)
    assert lr_factor(0.5, o) == pytest.approx(0.1)
    assert lr_factor(5.0, o) == 1.0
    assert lr_factor(159.99, o) == 1.0
    assert lr_factor(160.0, o) == 0.01
    assert lr_factor(180.5, o) == 0.0001


def test_cosine_schedule_values():
    o = preset("imagenet-lt").optim
    assert lr_factor(0.0, o) == pytest.approx(1.0)
    assert lr_factor(45.0, o) == pytest.approx(0.5)
    assert lr_factor(90.0, o) == pytest.approx(0.0, abs=1e-12)


def test_scaled_schedule_moves_milestones_in_proportion():
    c = scale_epochs(preset("cifar100-lt"), 20)
    o = c.optim
    assert (o.epochs, o.warmup_epochs, o.milestones) == (20, 0.5, (16, 18))
    assert c.loss.drw_epoch == 16  # LDAM-DRW re-weights from the first lr drop, scaled like it


def _scaled_to_30(cfg: TrainConfig) -> bool:
    return (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.milestones, cfg.loss.drw_epoch) == (30, 0.75, (24, 27), 24)


def test_one_resolver_scales_a_30_epoch_study_cli_run_and_reproduction():
    """`--epochs 30` means the same schedule everywhere: warm-up 5 -> 0.75, milestones 160/180 -> 24/27, DRW 160 -> 24
    (a study once kept 160/180, so a short study's learning rate never decayed)."""
    import runpy
    from pathlib import Path

    from mbib.reproduction import grid
    from mbib.study.cli import study_parser, study_spec

    cifar_grid = runpy.run_path(str(Path(__file__).parents[1] / "studies" / "cifar_grid.py"))
    args = study_parser("studies/cifar_grid.py", "").parse_args(["--epochs", "30", "--set", "optim.lr=0.05"])
    spec = study_spec(args, name="cifar100-lt-mbib", preset_name="cifar100-lt", datasets=cifar_grid["DATASETS"],
                      num_samples=24, max_concurrent=8, gpus_per_trial=0.25)
    study_cfg = spec.base_config(spec.datasets[0])
    assert _scaled_to_30(study_cfg) and study_cfg.optim.lr == 0.05 and study_cfg.data.imbalance_factor == 100

    cli_cfg = _cli_config(["train", "--epochs", "30", "--method", "ldam-drw"])
    assert _scaled_to_30(cli_cfg) and cli_cfg.loss.method == "ldam-drw"
    assert _scaled_to_30(grid.base_config(grid.Plan("cifar100-lt", 30, 0, ("ce",), (100.0,), {})))
    # explicit settings win as given over the scaled schedule
    assert resolve_config("cifar100-lt", {"optim.milestones": "10,20"}, epochs=30).optim.milestones == (10, 20)


def test_smoke_study_epochs_scale_the_smoke_schedule():
    from mbib.study.cli import study_parser, study_spec

    args = study_parser("s", "").parse_args(["--smoke", "--epochs", "30"])
    spec = study_spec(args, name="s", preset_name="cifar100-lt", datasets=[], num_samples=1, max_concurrent=1,
                      gpus_per_trial=0.0)
    o = spec.base_config(spec.datasets[-1]).optim
    assert (o.epochs, o.warmup_epochs, o.schedule, o.milestones) == (30, 4.0, "cosine", ())  # a sixth of the run


def test_image_folders_are_used_as_stored_unless_an_imbalance_factor_is_given():
    assert resolve_config("cifar100-lt", {"data.dataset": "imagefolder:/x"}).data.imbalance_factor is None
    assert resolve_config("cifar100-lt", {"data.dataset": "imagefolder:/x", "data.imbalance_factor": 8}
                          ).data.imbalance_factor == 8
    assert _cli_config(["train", "--dataset", "imagefolder:/x"]).data.imbalance_factor is None


def _cli_config(argv: list[str]) -> TrainConfig:
    import argparse

    from mbib.cli import _train_parser, config_from_args

    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(argv))


def test_device_options_gate_gpu_paths():
    cpu = device_options(torch.device("cpu"), amp=True, channels_last=True, bf16_ok=False)
    assert cpu.amp_dtype is None and cpu.channels_last and not cpu.grad_scaler  # no native bf16: fp32, NHWC
    amx = device_options(torch.device("cpu"), amp=True, channels_last=True, bf16_ok=True)
    assert amx.amp_dtype is torch.bfloat16 and not amx.grad_scaler
    assert device_options(torch.device("cpu"), amp=False, channels_last=False, bf16_ok=True) == \
        DeviceOptions(torch.device("cpu"), None, False, False)  # both switches turn the CPU paths off
    bf16 = device_options(torch.device("cuda"), amp=True, channels_last=True, bf16_ok=True)
    assert bf16.amp_dtype is torch.bfloat16 and bf16.channels_last and not bf16.grad_scaler
    fp16 = device_options(torch.device("cuda"), amp=True, channels_last=False, bf16_ok=False)
    assert fp16.amp_dtype is torch.float16 and fp16.grad_scaler and not fp16.channels_last
    off = device_options(torch.device("cuda"), amp=False, channels_last=True, bf16_ok=True)
    assert off.amp_dtype is None and not off.grad_scaler


def test_cpu_workers_share_the_cluster_cpus():
    from mbib.train.runner import worker_cpus

    assert worker_cpus(None, use_gpu=False, num_workers=1, cluster_cpus=2) == 2  # one CPU worker: every core
    assert worker_cpus(None, use_gpu=False, num_workers=2, cluster_cpus=5) == 2
    assert worker_cpus(None, use_gpu=False, num_workers=4, cluster_cpus=2) == 1
    assert worker_cpus(None, use_gpu=True, num_workers=2, cluster_cpus=32) == 1
    assert worker_cpus(0.5, use_gpu=False, num_workers=1, cluster_cpus=2) == 0.5  # as asked


def test_head_weight_decay_applies_to_the_classifier_heads_only():
    cfg = apply_overrides(preset("cifar100-lt"), {"optim.head_weight_decay": 0.0})
    task = build_task(cfg, model_spec(cfg, 3), [500, 100, 10])
    groups = task.param_groups()
    heads = {id(p) for p in task.network.heads.parameters()}
    own = [g for g in groups if g.get("weight_decay") == 0.0]
    assert len(own) == 1 and {id(p) for p in own[0]["params"]} == heads and len(heads) == 8  # v1..v3, z: weight, bias
    rest = [p for g in groups if "weight_decay" not in g for p in g["params"]]
    assert rest and not heads & {id(p) for p in rest}  # backbone and bottleneck keep optim.weight_decay
    default = build_task(preset("cifar100-lt"), model_spec(cfg, 3), [500, 100, 10]).param_groups()
    assert len(default) == 1  # unset: one group, every weight at optim.weight_decay (the paper)


def test_study_flags_choose_data_sets_and_refuse_gpu_counts_ray_cannot_place():
    import runpy
    from pathlib import Path

    from mbib.study.cli import study_parser, study_spec

    grid = runpy.run_path(str(Path(__file__).parents[1] / "studies" / "cifar_grid.py"))["DATASETS"]

    def spec(*argv):
        return study_spec(study_parser("s", "").parse_args(list(argv)), name="s", preset_name="cifar100-lt",
                          datasets=grid, num_samples=24, max_concurrent=8, gpus_per_trial=0.25)

    assert [d.key for d in spec("--only", "cifar100-lt-if100").datasets] == ["cifar100-lt-if100"]
    assert [d.key for d in spec("--only", "cifar100-lt-if10,cifar100-lt-if100").datasets] == \
        ["cifar100-lt-if100", "cifar100-lt-if10"]  # the study's order
    with pytest.raises(ConfigError, match="--only cifar10: this study's data sets are cifar100-lt-if10, "):
        spec("--only", "cifar10")
    one = spec("--gpus-per-trial", "0.125")
    assert one.gpus_per_trial == 0.125 and one.base_config(one.datasets[0]).runtime.gpus_per_worker == 0.125
    assert spec().gpus_per_trial == 0.25 and spec("--gpus-per-trial", "2").gpus_per_trial == 2
    with pytest.raises(ConfigError, match="--gpus-per-trial 1.5: Ray takes a fraction up to 1"):
        spec("--gpus-per-trial", "1.5")
