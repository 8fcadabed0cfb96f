"""Long-tailed subsampling of a balanced training set, as in Cao et al. (2019), LDAM-DRW.

Class i keeps n_i = int(n_max * IF^(-i/(K-1))) images, so class 0 is the head and class K-1 the tail.
Which images a class keeps follows Cao et al.'s IMBALANCECIFAR: seed numpy's legacy generator once,
then, class by class in label order, shuffle that class's indices and keep the first n_i. With
seed=0 this reproduces their CIFAR-100-LT subset exactly; a given seed always gives the same subset.
"""

from __future__ import annotations

import numpy as np

from mbib.errors import ConfigError, DataError


def lt_class_counts(num_classes: int, max_count: int, imbalance_factor: float) -> list[int]:
    """Images per class of the exponential long-tail profile (head first)."""
    if num_classes < 1 or max_count < 1:
        raise ConfigError(f"need num_classes >= 1 and max_count >= 1, got {num_classes} and {max_count}")
    if imbalance_factor < 1:
        raise ConfigError(f"imbalance factor must be >= 1 (N_max/N_min), got {imbalance_factor}")
    if num_classes == 1:
        return [max_count]
    ratio = 1.0 / imbalance_factor
    # Cao et al.: n_i = n_max * (1/IF)^(i/(K-1)), truncated; IF = N_max/N_min (Sec. 4.1)
    return [max(1, int(max_count * ratio ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def longtail_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Indices into `labels` keeping counts[c] images of class c, grouped by class in label order."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)  # legacy generator: matches Cao et al.'s np.random.seed + shuffle
    kept = []
    for cls, n in enumerate(counts):
        idx = np.flatnonzero(labels == cls)
        if n > len(idx):
            raise DataError(f"class {cls} has {len(idx)} training images but the long-tail profile asks for {n}; "
                            "lower max_count")
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
