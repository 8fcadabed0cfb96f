"""An in-memory data set held on the training device, with each epoch's draws made up front.

The fast training step (mbib.train.fast_step) reads its batches from here without the host: the train and test
images stay uint8 tensors on the device, and an epoch's plan holds the shuffled order and every image's crop
and flip, drawn from the same generators with the same calls in the same order as InMemorySource.epoch, so a
run sees exactly the images and crops of the per-batch path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mbib.data.augment import PAD, CropFlip, crop_flip, normalize, sample_crop_flip
from mbib.data.source import Batch, DataSource, InMemorySource
from mbib.data.strong_augment import AUGMENTATIONS


def resident_ok(source: DataSource) -> bool:
    """In-memory images, one worker, one view of the standard crop and flip: what the up-front plan draws."""
    return (isinstance(source, InMemorySource) and source.views == 1 and source.shard.world_size == 1
            and source.augment is AUGMENTATIONS["standard"])


@dataclass
class EpochPlan:
    """One epoch's draws, flat over its images in iteration order: dataset index, crop offsets, flip."""

    order: torch.Tensor  # [n] long
    top: torch.Tensor  # [n] long
    left: torch.Tensor  # [n] long
    flip: torch.Tensor  # [n] bool
    sizes: tuple[int, ...]  # the epoch's batch sizes, in order

    def copy_(self, other: EpochPlan) -> None:
        """Overwrite in place: captured CUDA graphs read these tensors at fixed addresses."""
        for name in ("order", "top", "left", "flip"):
            getattr(self, name).copy_(getattr(other, name))


class ResidentData:
    """The source's training and test sets as device tensors; plans epochs and gathers their batches."""

    def __init__(self, source: InMemorySource) -> None:
        if not resident_ok(source):
            raise ValueError("resident data serves one worker's single standard-augmented view")
        self.source = source
        d, shard = source.data, source.shard
        self.device, self.channels_last = shard.device, shard.channels_last
        self.x_train, self.y_train = d.x_train.to(self.device), d.y_train.to(self.device)
        self.x_test, self.y_test = d.x_test.to(self.device), d.y_test.to(self.device)
        # built once: normalize() would otherwise copy mean and std to the device on every call
        self.mean = torch.as_tensor(d.mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(d.std, dtype=torch.float32, device=self.device)
        self.batch_size = source.batches.batch_size

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's shuffle and every batch's crop and flip, drawn as InMemorySource.epoch draws them."""
        batches = self.source.batches
        batches.set_epoch(epoch)
        order = batches.shard_indices()
        gen = self.source.epoch_generator(epoch)
        sizes = tuple(min(self.batch_size, len(order) - s) for s in range(0, len(order), self.batch_size))
        draws = [sample_crop_flip(n, PAD, gen, self.device) for n in sizes]  # one draw per batch, in batch order
        return EpochPlan(order.to(self.device), torch.cat([c.top for c in draws]), torch.cat([c.left for c in draws]),
                         torch.cat([c.flip for c in draws]), sizes)

    def gather(self, plan: EpochPlan, positions: torch.Tensor) -> Batch:
        """The augmented, normalised batch of the plan's images at `positions` (a device tensor: no host sync)."""
        index = plan.order.index_select(0, positions)
        params = CropFlip(plan.top.index_select(0, positions), plan.left.index_select(0, positions),
                          plan.flip.index_select(0, positions))
        x = normalize(crop_flip(self.x_train.index_select(0, index), params), self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return Batch(x, self.y_train.index_select(0, index), index)

    def batches(self, plan: EpochPlan) -> Iterator[Batch]:
        """The plan's batches one by one (what the fast step gathers, for checks against the per-batch path)."""
        start = 0
        for n in plan.sizes:
            yield self.gather(plan, torch.arange(start, start + n, device=self.device))
            start += n

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised test images and labels in order, sliced from the device copy."""
        for start in range(0, len(self.y_test), batch_size):
            x = normalize(self.x_test[start:start + batch_size], self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y_test[start:start + batch_size]
