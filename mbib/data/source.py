"""Where a worker's batches come from: one interface over in-memory and file-backed data sets.

In-memory sets (CIFAR, MNIST, npz, small image folders) are uint8 tensors, shuffled and sharded by
BatchIterator and augmented as a batch on the device; file-backed sets (ImageNet-LT, iNat, large image folders)
are decoded and transformed by a DataLoader. `open_source` is the one place that tells them apart, so the
engine only asks a source for its epochs and its test batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mbib.data.augment import normalize
from mbib.data.datasets import ImageData
from mbib.data.filelist import FileListData, IndexedViews
from mbib.data.loader import BatchIterator
from mbib.data.recompress import recompress_key

Data = ImageData | FileListData  # both expose name, classes, class_counts, mean, std and image_size


class Batch(NamedTuple):
    """One training batch on the device: normalised, augmented images and what the losses need besides."""

    x: torch.Tensor  # [B, 3, H, W], the view the classifier heads see
    y: torch.Tensor  # [B] labels
    index: torch.Tensor  # [B] dataset indices (GML leaves a query's own keys out of its temperature term)
    views: tuple[torch.Tensor, ...] = ()  # further views of the same images (GML: query, key)


@dataclass(frozen=True)
class Shard:
    """This worker's part of the data: rank of world_size, and the device (and its layout) batches go to."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False

    def place(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def data_spec(d: Data) -> dict[str, Any]:
    """What a checkpoint keeps of its data set: export and serving normalise and resize with it; a dosed set
    (data.recompress) says its dose, so a run on it never continues from a checkpoint of the undosed one."""
    spec = {"dataset": d.name, "classes": list(d.classes), "mean": list(d.mean), "std": list(d.std),
            "image_size": d.image_size, "class_counts": list(map(int, d.class_counts))}
    dose = recompress_key(getattr(d, "recompress", "none"))  # file-list sets are never dosed
    return {**spec, "recompress": dose} if dose else spec


class DataSource:
    """A worker's training epochs and test batches; subclasses say how batches are read and views drawn."""

    def __init__(self, data: Data, shard: Shard, batch_size: int, seed: int, views: int, workers: int) -> None:
        self.data, self.shard, self.seed, self.views, self.workers = data, shard, seed, views, workers
        self.batches = self.train_batches(batch_size)  # (x, y, index) batches of this worker's shard

    def __len__(self) -> int:
        return len(self.batches)

    def train_batches(self, batch_size: int):
        raise NotImplementedError

    def draw_views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The batch's `views` normalised, augmented views on the device; x as read, already placed."""
        raise NotImplementedError

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised test images of this worker's shard (every world_size-th image) and their labels."""
        raise NotImplementedError

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Augmented, normalised batches of this worker's shard; seeded by (seed, epoch, rank) for exact resumes."""
        device = self.shard.device
        self.batches.set_epoch(epoch)
        gen = self.epoch_generator(epoch)
        for x, y, index in self.batches:
            views = self.draw_views(x, gen)
            yield Batch(views[0], y.to(device, non_blocking=True), index.to(device), tuple(views[1:]))

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator an epoch's augmentation draws from, on the device: (seed, epoch, rank) fix its draws."""
        return torch.Generator(device=self.shard.device).manual_seed(
            self.seed * 1_000_003 + epoch * 1_009 + self.shard.rank)


class InMemorySource(DataSource):
    """uint8 tensors: every view is its own draw of the batched augmentation, on the training device."""

    def __init__(self, data: ImageData, shard: Shard, batch_size: int, seed: int, views: int, workers: int,
                 augment: str) -> None:
        # imported here: strong augmentation pulls in torchvision's v2 transforms
        from mbib.data.strong_augment import AUGMENTATIONS

        self.augment = AUGMENTATIONS[augment]
        super().__init__(data, shard, batch_size, seed, views, workers)

    def train_batches(self, batch_size: int) -> BatchIterator:
        return BatchIterator(self.data.x_train, self.data.y_train, batch_size=batch_size, shuffle=True, seed=self.seed,
                             rank=self.shard.rank, world_size=self.shard.world_size, return_index=True)

    def draw_views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = self.shard.place(x)
        return [self.augment(x, self.data.mean, self.data.std, generator=generator) for _ in range(self.views)]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d, shard = self.data, self.shard
        idx = torch.arange(shard.rank, len(d.y_test), shard.world_size)
        for start in range(0, len(idx), batch_size):
            sel = idx[start:start + batch_size]
            yield normalize(shard.place(d.x_test[sel]), d.mean, d.std), d.y_test[sel].to(shard.device)


class FileListSource(DataSource):
    """Image files: a DataLoader decodes and transforms them, drawing the views itself ([B, V, 3, H, W])."""

    def train_batches(self, batch_size: int):
        from torch.utils.data import DataLoader, DistributedSampler

        shard = self.shard
        train = IndexedViews(self.data.train, self.views)
        sampler = DistributedSampler(train, num_replicas=shard.world_size, rank=shard.rank, seed=self.seed)
        loader = DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                            pin_memory=shard.device.type == "cuda", persistent_workers=self.workers > 0)
        loader.set_epoch = sampler.set_epoch
        return loader

    def draw_views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        # views are placed one by one: channels_last needs 4-D tensors
        return [self.shard.place(v) for v in x.unbind(1)] if self.views > 1 else [self.shard.place(x)]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader, Subset

        shard = self.shard
        test = Subset(self.data.test, range(shard.rank, len(self.data.test), shard.world_size))
        for x, y in DataLoader(test, batch_size=batch_size, num_workers=self.workers):
            yield shard.place(x), y.to(shard.device)


def open_source(data: Data, shard: Shard, *, batch_size: int, seed: int, views: int = 1, workers: int = 0,
                augment: str = "standard") -> DataSource:
    """The source of `data` for this worker: `views` augmented draws of each training image per batch;
    `augment` names the in-memory augmentation, `workers` the DataLoader processes of file-backed data."""
    if isinstance(data, ImageData):
        return InMemorySource(data, shard, batch_size, seed, views, workers, augment)
    return FileListSource(data, shard, batch_size, seed, views, workers)
