"""AutoAugment's CIFAR-10 policy (Cubuk et al., 2019) on whole uint8 batches, every image with its own draw.

torchvision's v2.AutoAugment draws one sub-policy per call, so a per-image policy meant one call per image:
~50 ms per 128 CIFAR images on a CPU core, and hundreds of tiny kernel launches per batch on a GPU (GML's
three views made its H200 epochs 7x slower than MBIB's). Here each image draws its sub-policy, the two ops'
application coins and the magnitude signs from the caller's generator; then each op runs once per batch on
the images that drew it, with per-image magnitudes. Ops and magnitudes follow torchvision's AutoAugment
(10 magnitude bins, nearest interpolation, fill 0, shear about the top-left corner, rotation about the
centre, integer translations); tests check each op against torchvision image by image.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# (op, probability, magnitude bin) pairs of the paper's CIFAR-10 policy, 25 sub-policies
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
NUM_BINS = 10
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def draw_on(generator: torch.Generator | None) -> dict:
    """Random draws must happen on the generator's device (a CUDA generator cannot fill CPU tensors)."""
    return {"generator": generator, "device": generator.device if generator is not None else None}


def magnitude(op: str, level: int | None, height: int, width: int) -> float:
    """The op's magnitude at bin ``level`` of NUM_BINS (AutoAugment's ranges; unsigned)."""
    if level is None:
        return 0.0
    t = level / (NUM_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * t
    if op in ("TranslateX", "TranslateY"):
        return 150.0 / 331.0 * (width if op == "TranslateX" else height) * t  # 150 px of a 331 px image
    if op == "Rotate":
        return 30.0 * t  # degrees
    if op == "Posterize":
        return float(round(8 - 4 * t))  # bits kept
    if op == "Solarize":
        return 1.0 - t  # threshold as a fraction of 255
    return 0.9 * t  # Brightness, Color, Contrast, Sharpness: factor 1 +- this


def _blend(x: torch.Tensor, other, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * x + (1 - ratio) * other per image, clamped and truncated to uint8 as torchvision does."""
    r = ratio.view(-1, 1, 1, 1)
    return (x.float() * r + other * (1.0 - r)).clamp(0, 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, floored as torchvision does for uint8 (a 1-channel image is its own grey)."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x.float().unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).floor().unsqueeze(1)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    blurred = F.conv2d(x.float(), (kernel / 13.0).expand(c, 1, 3, 3), groups=c).round()
    out = x.float()
    inner = out[..., 1:-1, 1:-1]  # the border keeps its pixels, as in PIL and torchvision
    out[..., 1:-1, 1:-1] = inner + (1.0 - factor.view(-1, 1, 1, 1)) * (blurred - inner)
    return out.clamp(0, 255).to(torch.uint8)


def _warp(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp; ``inverse`` [n, 2, 3] maps output pixel (col, row, 1) to its input pixel."""
    n, c, h, w = x.shape
    to_norm = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]], device=x.device)
    to_pix = torch.linalg.inv(to_norm)
    full = torch.cat([inverse, torch.tensor([0.0, 0.0, 1.0], device=x.device).expand(n, 1, 3)], 1)
    theta = (to_norm @ full @ to_pix)[:, :2]  # normalised output -> normalised input, as affine_grid wants
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).to(torch.uint8)


def _affine(x: torch.Tensor, a, b, tx, c, d, ty) -> torch.Tensor:
    """Warp with input = [[a, b, tx], [c, d, ty]] @ (col, row, 1), each entry a per-image tensor."""
    return _warp(x, torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1))


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise by ``degrees`` about the image centre."""
    h, w = x.shape[-2:]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    rad = degrees * (math.pi / 180.0)
    cos, sin = rad.cos(), rad.sin()
    return _affine(x, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _op(name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply op ``name`` to uint8 images ``x`` [n, C, H, W] with per-image signed magnitudes ``m`` [n]."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    if name == "ShearX":  # about the image's top-left corner, half a pixel off the first pixel's centre
        return _affine(x, one, m, 0.5 * m, zero, one, zero)
    if name == "ShearY":
        return _affine(x, one, zero, zero, m, one, 0.5 * m)
    if name == "TranslateX":
        return _affine(x, one, zero, -m.trunc(), zero, one, zero)
    if name == "TranslateY":
        return _affine(x, one, zero, zero, zero, one, -m.trunc())
    if name == "Rotate":
        return _rotate(x, m)
    if name == "Brightness":
        return _blend(x, 0.0, 1.0 + m)
    if name == "Color":
        return x if x.shape[1] == 1 else _blend(x, _grey(x), 1.0 + m)
    if name == "Contrast":
        return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), 1.0 + m)
    if name == "Sharpness":
        return _sharpness(x, 1.0 + m)
    if name == "Posterize":
        bits = m.round().to(torch.int32)
        mask = ((1 << bits) - 1) << (8 - bits)
        return x & mask.to(torch.uint8).view(-1, 1, 1, 1)
    if name == "Solarize":
        return torch.where(x.float() >= (255.0 * m).view(-1, 1, 1, 1), 255 - x, x)
    if name == "AutoContrast":
        return TF.autocontrast(x)  # per image and channel already
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return 255 - x
    raise ValueError(f"unknown AutoAugment op {name!r}")


@functools.lru_cache(maxsize=8)  # built once per image size, not once per batch and view
def _policy_tables(height: int, width: int) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy as tensors [25, 2]: op ids (into the returned names), probabilities, magnitudes, signedness."""
    names = sorted({op for sub in CIFAR10_POLICY for op, _, _ in sub})
    ids = torch.tensor([[names.index(op) for op, _, _ in sub] for sub in CIFAR10_POLICY])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY])
    mags = torch.tensor([[magnitude(op, lv, height, width) for op, _, lv in sub] for sub in CIFAR10_POLICY])
    signed = torch.tensor([[op in SIGNED for op, _, _ in sub] for sub in CIFAR10_POLICY])
    return names, ids, probs, mags, signed


def auto_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAugment (CIFAR-10 policy) on a uint8 batch [B, C, H, W]: each image draws its own sub-policy.

    Random draws come from ``generator`` on its own device (the global RNG is untouched); the images stay
    on theirs. Each op runs once for all images that drew it.
    """
    b, _, h, w = x.shape
    names, ids, probs, mags, signed = _policy_tables(h, w)
    draw = draw_on(generator)
    policy = torch.randint(len(CIFAR10_POLICY), (b,), **draw).cpu()
    applied = torch.rand(b, 2, **draw).cpu() < probs[policy]
    flip = signed[policy] & (torch.rand(b, 2, **draw).cpu() < 0.5)
    op, m = ids[policy], torch.where(flip, -mags[policy], mags[policy])
    out = x.clone()
    for slot in (0, 1):
        for k in op[:, slot][applied[:, slot]].unique().tolist():
            rows = ((op[:, slot] == k) & applied[:, slot]).nonzero().squeeze(1)
            idx = rows.to(x.device)
            out[idx] = _op(names[k], out[idx], m[rows, slot].to(x.device))
    return out
