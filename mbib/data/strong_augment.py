"""The strong CIFAR augmentation of PaCo and GML, on uint8 batches: crop, flip, AutoAugment, Cutout.

Order follows the authors' pipeline: random crop (zero pad 4) -> horizontal flip -> AutoAugment
(CIFAR10 policy, each image its own sub-policy: mbib.data.autoaugment) -> Cutout (one 16 px square,
zeroed, centre anywhere in the image, clipped) -> normalise. Every random draw comes from ``generator``
(on its device), so runs are reproducible and the caller's global RNG stream is left untouched.
"""

from __future__ import annotations

import torch

from mbib.data.autoaugment import auto_augment, draw_on


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator=None) -> torch.Tensor:
    """Per-image random crop from the zero-padded batch, then a random horizontal flip (uint8 kept)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), **draw_on(generator)).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), **draw_on(generator)).to(x.device)
    flip = (torch.rand(b, **draw_on(generator)) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading the columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, length: int = 16, generator=None) -> torch.Tensor:
    """Zero one length x length square per image, centred uniformly, clipped at the border (DeVries)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), **draw_on(generator)).to(x.device)
    cx = torch.randint(0, w, (b,), **draw_on(generator)).to(x.device)
    half = length // 2
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_y = (ys[None] >= cy[:, None] - half) & (ys[None] < cy[:, None] + half)
    in_x = (xs[None] >= cx[:, None] - half) & (xs[None] < cx[:, None] + half)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return x.masked_fill(hole, 0)


def strong_augment(x_uint8: torch.Tensor, mean, std, generator=None) -> torch.Tensor:
    """Crop + flip + AutoAugment + Cutout 16, normalised to float [B, C, H, W] (cifar_augment's signature)."""
    x = random_crop_flip(x_uint8, generator=generator)
    x = auto_augment(x, generator=generator)
    x = cutout(x, generator=generator)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x.float() / 255.0 - mean_t) / std_t


def _standard(x_uint8: torch.Tensor, mean, std, generator=None) -> torch.Tensor:
    """MBIB's preset (crop + flip), imported lazily from mbib.data.augment."""
    from mbib.data.augment import cifar_augment

    return cifar_augment(x_uint8, mean, std, generator=generator)


AUGMENTATIONS = {"standard": _standard, "strong": strong_augment}
