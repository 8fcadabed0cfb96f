"""The in-memory form every data source returns before long-tailing: numpy, channels last."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RawData:
    """A balanced train/test split as read from disk: x uint8 [N,H,W,C], y int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
