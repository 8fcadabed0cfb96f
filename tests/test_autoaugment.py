"""Batched AutoAugment: each op equals torchvision's image by image; per-image draws, reproducible, any device."""

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mbib.data.autoaugment import CIFAR10_POLICY, NUM_BINS, SIGNED, _op, auto_augment, magnitude

UNSIGNED = ("Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")


def torchvision_op(name, img, m):
    """What torchvision's AutoAugment does for op ``name`` at signed magnitude ``m`` on one image."""
    shear = math.degrees(math.atan(m))
    return {
        "ShearX": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0], center=[0, 0]),
        "ShearY": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear], center=[0, 0]),
        "TranslateX": lambda: TF.affine(img, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0]),
        "TranslateY": lambda: TF.affine(img, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0]),
        "Rotate": lambda: TF.rotate(img, angle=m),
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda: TF.posterize(img, int(m)),
        "Solarize": lambda: TF.solarize(img, 255.0 * m),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
        "Invert": lambda: TF.invert(img),
    }[name]()


def test_policy_and_magnitudes_are_torchvisions():
    reference = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    assert tuple(map(tuple, reference._policies)) == CIFAR10_POLICY
    for name, (bins, signed) in reference._AUGMENTATION_SPACE.items():
        assert (name in SIGNED) == signed
        values = bins(NUM_BINS, 32, 32)
        if values is not None:
            ours = torch.tensor([magnitude(name, level, 32, 32) for level in range(NUM_BINS)])
            assert torch.allclose(ours, values.float(), atol=1e-5), name


@pytest.mark.parametrize("name", sorted(SIGNED) + list(UNSIGNED))
def test_each_op_matches_torchvision_per_image_magnitudes(name):
    g = torch.Generator().manual_seed(0)
    x = TF.gaussian_blur(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g), 5)
    levels, signs = [0, 3, 5, 7, 9, 9], [1, -1, 1, -1, 1, -1]
    m = torch.tensor([magnitude(name, lv, 32, 32) * (s if name in SIGNED else 1) for lv, s in zip(levels, signs)])
    ours = _op(name, x.clone(), m)  # one call, six magnitudes
    ref = torch.stack([torchvision_op(name, x[i], float(m[i])) for i in range(len(x))])
    diff = (ours.int() - ref.int()).abs()
    assert ours.dtype == torch.uint8 and diff.max() <= 1  # float rounding at an integer boundary, at most
    assert (diff == 0).float().mean() > 0.99


def test_images_draw_their_own_sub_policies_reproducibly():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    before = torch.random.get_rng_state()
    a = auto_augment(x, torch.Generator().manual_seed(4))
    b = auto_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), before)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert len({img.sum().item() for img in a}) > 16  # one image 64 times: many different results
    assert torch.equal(auto_augment(x[:0], torch.Generator()), x[:0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_augment_on_cuda_equals_cpu_for_the_same_draws():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    cpu = auto_augment(x, torch.Generator().manual_seed(1))
    gpu = auto_augment(x.cuda(), torch.Generator().manual_seed(1))  # same CPU draws, CUDA images
    assert (cpu.int() - gpu.cpu().int()).abs().max() <= 1
