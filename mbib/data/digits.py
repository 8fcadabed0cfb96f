"""scikit-learn's bundled 8x8 digits (1,797 images, offline) as a 32x32 image data set for smoke runs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mbib.data.raw import RawData

TEST_PER_CLASS = 30  # balanced test set: the last 30 images of every digit (mirrors mnist10k's split)
SIZE = 32


def read_digits() -> RawData:
    """Digits scaled from 0..16 to 0..255 and bilinearly upsampled 8x8 -> 32x32 (one channel)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0).unsqueeze(1)  # 0..16 -> 0..255
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = images.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    y = bunch.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    for cls in range(10):
        test[np.flatnonzero(y == cls)[-TEST_PER_CLASS:]] = True
    return RawData(x[~test], y[~test], x[test], y[test], [str(d) for d in range(10)])
