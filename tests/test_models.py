"""Tests for mbib.models: tap shapes, head keys, parameter counts, tap rule, gradients, channels_last parity."""
import pytest
import torch
import torchvision

from mbib.errors import ConfigError
from mbib.models import NormedLinear, build_model, ensemble_logits, list_models, select_taps
from mbib.models.resnet_cifar import CifarBasicBlock, PadShortcut

PAPER_MBIB_PARAMS = 486_020  # Table 6, ResNet-32 MBIB on CIFAR-100

# (name, input size, tap widths v1..v3)
BACKBONES = [
    ("resnet32", 32, [16, 32, 64]),
    ("resnet10", 64, [128, 256, 512]),
    ("resnet50", 64, [512, 1024, 2048]),
    ("resnext50_32x4d", 64, [512, 1024, 2048]),
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_lists_all_contract_names():
    assert list_models() == ["resnet32", "resnet10", "resnet50", "resnext50_32x4d"]


@pytest.mark.parametrize("name,size,widths", BACKBONES)
def test_tap_feature_and_logit_shapes(name, size, widths):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, size, size))
        logits = model(torch.randn(2, 3, size, size))
    assert [tuple(feats[k].shape) for k in ("v1", "v2", "v3")] == [(2, w) for w in widths]
    assert feats["z"].shape == (2, widths[-1])  # default z_dim = final tap width
    assert all(v.shape == (2, 7) for v in logits.values())
    assert model.num_classes == 7 and model.tap_keys == ["v1", "v2", "v3"]


@pytest.mark.parametrize(
    "head,keys", [("mbib", {"v1", "v2", "v3", "z"}), ("bib", {"v3", "z"}), ("plain", {"v3"}), ("mlp", {"z"})]
)
def test_each_head_returns_exactly_contract_keys(head, keys):
    model = build_model("resnet32", 10, head=head).eval()
    x = torch.randn(2, 3, 32, 32)
    assert set(model(x)) == keys
    assert set(model.features(x)) == keys
    assert model.tap_keys == sorted(k for k in keys if k != "z")


def test_resnet32_mbib_parameter_count_matches_table6():
    total = n_params(build_model("resnet32", 100))
    print(f"ResNet-32 MBIB (100 classes): {total} params vs paper 486.02k ({(total / PAPER_MBIB_PARAMS - 1):+.3%})")
    # 463,504 backbone + h 1,700 + u 3,300 + f 6,500 + FC(64->64) 4,160 + g 6,500
    assert total == 485_664
    assert abs(total - PAPER_MBIB_PARAMS) / PAPER_MBIB_PARAMS < 1e-3


def test_resnet32_plain_is_the_047m_ldam_resnet32():
    assert n_params(build_model("resnet32", 100, head="plain")) == 470_004  # backbone + FC(64->100)


@pytest.mark.parametrize("name,factory", [("resnet50", torchvision.models.resnet50),
                                          ("resnext50_32x4d", torchvision.models.resnext50_32x4d)])
def test_224_plain_models_have_torchvision_parameter_count(name, factory):
    assert n_params(build_model(name, 1000, head="plain")) == n_params(factory())


def test_ensemble_is_mean_of_final_tap_and_z():
    model = build_model("resnet32", 10).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(ensemble_logits(out), (out["v3"] + out["z"]) / 2)
    torch.testing.assert_close(model.ensemble_logits(out), (out["v3"] + out["z"]) / 2)
    assert torch.equal(ensemble_logits({"v3": out["v3"]}), out["v3"])
    assert torch.equal(ensemble_logits({"z": out["z"]}), out["z"])
    # the final tap is the largest index, not the last in lexical order
    v10, v9 = torch.ones(1, 2), torch.zeros(1, 2)
    assert torch.equal(ensemble_logits({"v9": v9, "v10": v10, "z": v9}), torch.full((1, 2), 0.5))


@pytest.mark.parametrize("num_taps", [2, 3, 4, 5, 6])
def test_num_taps_gives_n_v_keys(num_taps):
    model = build_model("resnet32", 10, num_taps=num_taps).eval()
    out = model(torch.randn(2, 3, 32, 32))
    expected = [f"v{i}" for i in range(1, num_taps + 1)]
    assert model.tap_keys == expected and set(out) == set(expected) | {"z"}


def test_tap_rule_resnet32_adds_mid_stage_blocks_from_deepest_backwards():
    # (stage, block): stage ends are block 4 of 5; the middle is block 2 (after 3 of 5 blocks)
    assert select_taps([5, 5, 5], 2) == [(1, 4), (2, 4)]
    assert select_taps([5, 5, 5], 3) == [(0, 4), (1, 4), (2, 4)]
    assert select_taps([5, 5, 5], 4) == [(0, 4), (1, 4), (2, 2), (2, 4)]
    assert select_taps([5, 5, 5], 6) == [(0, 2), (0, 4), (1, 2), (1, 4), (2, 2), (2, 4)]
    # 4-stage nets: default is the last three stages; ResNet-10 (1 block/stage) adds layer1, then runs out
    assert select_taps([3, 4, 6, 3], 3) == [(1, 3), (2, 5), (3, 2)]
    assert select_taps([1, 1, 1, 1], 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    with pytest.raises(ConfigError, match="num_taps <= 4"):
        build_model("resnet10", 10, num_taps=5)
    for bad in (1, 7):
        with pytest.raises(ConfigError, match="from 2 to 6"):
            build_model("resnet32", 10, num_taps=bad)


def test_mid_stage_tap_reads_the_right_block():
    model = build_model("resnet32", 10, num_taps=4).eval()
    x = torch.randn(2, 3, 32, 32)
    bb = model.backbone
    with torch.no_grad():
        h = bb.stages[1](bb.stages[0](bb.stem(x)))
        mid = bb.stages[2][:3](h)
        assert torch.allclose(model.features(x)["v3"], mid.mean(dim=(2, 3)), atol=1e-6)


def test_input_tap_is_gap_of_image():
    model = build_model("resnet32", 10, input_tap=True).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, out = model.features(x), model(x)
    assert model.tap_keys == ["x", "v1", "v2", "v3"] and set(out) == {"x", "v1", "v2", "v3", "z"}
    torch.testing.assert_close(feats["x"], x.mean(dim=(2, 3)))
    torch.testing.assert_close(ensemble_logits(out), (out["v3"] + out["z"]) / 2)
    with pytest.raises(ConfigError):
        build_model("resnet32", 10, head="bib", input_tap=True)


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
    block = CifarBasicBlock(16, 32, stride=2)
    assert isinstance(block.shortcut, PadShortcut) and n_params(block.shortcut) == 0
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).reshape(2, 16, 4, 4)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # 8 zero channels on each side
    assert not y[:, :8].any() and not y[:, 24:].any()
    # no 1x1 projection convs anywhere in ResNet-32
    convs = [m for m in build_model("resnet32", 10).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31 and all(m.kernel_size == (3, 3) for m in convs)


def test_z_gets_gradient_from_g_and_taps_from_their_heads():
    model = build_model("resnet32", 10)
    out = model(torch.randn(4, 3, 32, 32))
    out["z"].square().sum().backward(retain_graph=True)
    assert model.z_fc[0].weight.grad.abs().sum() > 0 and model.heads["z"].weight.grad.abs().sum() > 0
    assert all(model.heads[k].weight.grad is None for k in ("v1", "v2", "v3"))
    model.zero_grad(set_to_none=True)
    out["v1"].square().sum().backward()
    assert model.heads["v1"].weight.grad.abs().sum() > 0
    assert model.backbone.stages[0][0].conv1.weight.grad.abs().sum() > 0
    assert model.backbone.stages[2][0].conv1.weight.grad is None  # v1's head never reaches stage 3
    assert model.z_fc[0].weight.grad is None


@pytest.mark.parametrize("name,size", [("resnet32", 32), ("resnet10", 64)])
def test_channels_last_matches_contiguous(name, size):
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    for k in ref:
        # fp32 sums in another order (oneDNN picks NHWC kernels by thread count): logits of ~10 agree to 1e-4
        torch.testing.assert_close(out[k], ref[k], atol=1e-4, rtol=1e-4)


def test_normed_heads_are_cosine_classifiers():
    model = build_model("resnet32", 10, normed=True).eval()
    assert all(isinstance(h, NormedLinear) for h in model.heads.values())
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert all(v.abs().max() <= 1 + 1e-6 for v in out.values())
    assert n_params(model) == 463_504 + (16 + 32 + 64 + 64) * 10 + 64 * 64 + 64  # cosine heads have no bias


def test_z_dim_and_activation_options():
    model = build_model("resnet32", 10, z_dim=32, z_act="tanh").eval()
    with torch.no_grad():
        z = model.features(torch.randn(2, 3, 32, 32))["z"]
    assert z.shape == (2, 32) and z.abs().max() <= 1
    with pytest.raises(ConfigError, match="z_act"):
        build_model("resnet32", 10, z_act="swishy")


def test_config_errors_are_one_line_and_name_the_fix():
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", 10)
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in list_models())
    with pytest.raises(ConfigError, match="valid options"):
        build_model("resnet32", 10, heads="mbib")
    with pytest.raises(ConfigError, match="mbib, bib, plain, mlp"):
        build_model("resnet32", 10, head="moe")


def test_cifar_models_never_import_torchvision():
    """torchvision pulls in torch._dynamo (~2 s a process): only a 224x224 backbone may import it."""
    import subprocess
    import sys

    code = ("import sys; from mbib.models import build_model; build_model('resnet32', 10); a = 'torchvision' in "
            "sys.modules; build_model('resnet10', 10); print(a, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
