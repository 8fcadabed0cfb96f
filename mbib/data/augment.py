"""Batched CIFAR augmentation on the tensors' own device: random crop (4-pixel zero padding), flip, normalise.

Equivalent to torchvision's RandomCrop(32, padding=4) -> RandomHorizontalFlip() -> ToTensor -> Normalize
applied image by image, but done for the whole batch with one gather and no Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD = 4


@dataclass
class CropFlip:
    """Per-image crop offsets into the padded image (0..2*pad) and horizontal-flip flags, each [B]."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor


def sample_crop_flip(batch: int, pad: int = PAD, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> CropFlip:
    """Draw crop offsets and flips; drawn on the generator's device, then moved to `device`."""
    gen_device = generator.device if generator is not None else torch.device(device)
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=gen_device)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=gen_device)
    flip = torch.rand(batch, generator=generator, device=gen_device) < 0.5
    return CropFlip(top.to(device), left.to(device), flip.to(device))


def crop_flip(x: torch.Tensor, params: CropFlip, pad: int = PAD) -> torch.Tensor:
    """Crop every image of x [B,C,H,W] from its zero-padded copy at (top, left), then flip where asked."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = params.top[:, None] + torch.arange(h, device=x.device)  # [B,H] rows of the padded image
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(params.flip[:, None], cols.flip(1), cols) + params.left[:, None]  # [B,W], reversed if flipped
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 (x/255 - mean)/std per channel; keeps x's memory format."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    # One fused affine map: (x/255 - m)/s = x * (1/(255 s)) - m/s.
    return torch.addcmul(-mean_t / std_t, x.to(torch.float32), 1.0 / (255.0 * std_t))


def cifar_augment(x: torch.Tensor, mean, std, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (pad 4) + horizontal flip + normalise a uint8 batch; float32 out, channels_last kept."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = normalize(crop_flip(x, sample_crop_flip(x.shape[0], PAD, generator, x.device)), mean, std)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
