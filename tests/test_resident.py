"""The device-resident data path draws exactly the per-batch path's images, labels, crops and flips (on the CPU
here; with MBIB_TEST_DEVICE=cuda in the GPU script, on CUDA generators)."""

import os

import pytest
import torch

from mbib.data.augment import normalize
from mbib.data.datasets import ImageData
from mbib.data.resident import ResidentData
from mbib.data.source import Shard, open_source

DEVICE = torch.device(os.environ.get("MBIB_TEST_DEVICE", "cpu"))


def _data(n: int = 300, k: int = 5) -> ImageData:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(n) % k
    return ImageData(x_train=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), y_train=y,
                     x_test=torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=g),
                     y_test=torch.arange(70) % k, classes=[str(c) for c in range(k)],
                     class_counts=torch.bincount(y).tolist(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), name="t")


@pytest.mark.parametrize("channels_last", [False, True])
def test_resident_batches_equal_the_per_batch_path(channels_last):
    data = _data()
    source = open_source(data, Shard(DEVICE, channels_last=channels_last), batch_size=64, seed=7)
    resident = ResidentData(source)
    for epoch in (0, 3):
        ours = list(resident.batches(resident.plan(epoch)))
        theirs = list(source.epoch(epoch))
        assert [len(b.y) for b in ours] == [64, 64, 64, 64, 44]  # the last, smaller batch too
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert torch.equal(a.index, b.index) and torch.equal(a.y, b.y)
            assert torch.equal(a.x, b.x)  # same crops and flips, bit for bit
            assert a.x.is_contiguous(memory_format=torch.channels_last) == channels_last
    # different epochs shuffle differently (a plan that ignored the epoch would pass the loop above only once)
    assert not torch.equal(resident.plan(0).order, resident.plan(1).order)


def test_resident_test_batches_are_the_normalised_test_set():
    data = _data()
    resident = ResidentData(open_source(data, Shard(DEVICE), batch_size=64, seed=0))
    xs, ys = zip(*resident.test_batches(32))
    assert [len(y) for y in ys] == [32, 32, 6]
    assert torch.equal(torch.cat(ys).cpu(), data.y_test)
    torch.testing.assert_close(torch.cat(xs).cpu(), normalize(data.x_test, data.mean, data.std))  # CUDA may fuse


def test_resident_refuses_what_it_cannot_plan():
    source = open_source(_data(), Shard(DEVICE), batch_size=64, seed=0, augment="strong")
    with pytest.raises(ValueError, match="standard-augmented"):
        ResidentData(source)
