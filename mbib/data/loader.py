"""In-memory batch iteration with a seeded per-epoch shuffle and DDP sharding.

Every rank draws the same permutation (torch.Generator seeded with seed + epoch) and takes every
world_size-th index starting at its rank, as torch's DistributedSampler does. Ranks must run the same
number of steps (collectives such as ray.train.report are barriers), so the permutation is made a multiple
of world_size: padded by wrapping around to its start, or, with drop_last, trimmed (shards then disjoint).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from mbib.errors import ConfigError


class BatchIterator:
    """Iterates (x, y) batches of this rank's shard; x and y stay on their device and dtype (uint8 images).

    With ``return_index`` the batches are (x, y, dataset indices) (GML matches queued keys to images by them).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, return_index: bool = False):
        if len(x) != len(y):
            raise ConfigError(f"images and labels differ in length ({len(x)} vs {len(y)}): pass matching tensors")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                              f"rank={rank}, world_size={world_size}")
        if len(x) < world_size:
            raise ConfigError(f"{len(x)} samples cannot be shared among {world_size} workers: use fewer workers")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.return_index = return_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses (identical on every rank)."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (the same on every rank)."""
        n = len(self.x)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def shard_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # wrap around so every rank gets the same number of samples
            order = torch.cat([order, order[: total - n]])
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        idx = self.shard_indices()
        for b in range(len(self)):
            batch = idx[b * self.batch_size:(b + 1) * self.batch_size]
            out = (self.x[batch.to(self.x.device)], self.y[batch.to(self.y.device)])
            yield (*out, batch) if self.return_index else out
