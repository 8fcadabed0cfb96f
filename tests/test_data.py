import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mbib.data import (BatchIterator, FileListDataset, ImageData, cifar_augment, load_dataset, load_filelist_data,
                       lt_class_counts, normalize)
from mbib.data.augment import crop_flip, sample_crop_flip
from mbib.data.cifar import CIFAR100, read_cifar
from mbib.data.datasets import CIFAR_MEAN, CIFAR_STD
from mbib.data.longtail import longtail_indices
from mbib.errors import DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- long tail

def test_lt_class_counts_cao_profile():
    counts = lt_class_counts(100, 500, 100)
    assert sum(counts) == 10847 and counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(lt_class_counts(100, 500, 10)) == 19573 and sum(lt_class_counts(10, 5000, 100)) == 12406
    assert lt_class_counts(5, 7, 1) == [7] * 5


def test_longtail_indices_match_cao_et_al_seeded_shuffle():
    labels = np.repeat(np.arange(4), 10)[np.random.RandomState(3).permutation(40)]
    counts = [10, 6, 3, 1]
    np.random.seed(0)  # reference: Cao et al. seed numpy once, then shuffle each class's indices in turn
    expected = []
    for cls, n in enumerate(counts):
        idx = np.where(labels == cls)[0]
        np.random.shuffle(idx)
        expected.extend(idx[:n])
    got = longtail_indices(labels, counts, seed=0)
    assert got.tolist() == list(expected)
    assert np.bincount(labels[got]).tolist() == counts
    assert longtail_indices(labels, counts, seed=1).tolist() != got.tolist()


# ---------------------------------------------------------------- torchvision CIFAR layout

def write_cifar100(root: Path, per_class_train: int = 6, per_class_test: int = 2) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    splits = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)[rng.permutation(100 * per_class)]
        data = rng.randint(0, 256, size=(len(labels), 3072)).astype(np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": [0] * len(labels)}, f)
        splits[split] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, f)
    return splits


def test_cifar_pickle_layout_is_decoded_plane_by_plane(tmp_path):
    splits = write_cifar100(tmp_path)
    raw = read_cifar(tmp_path, CIFAR100)
    data, labels = splits["train"]
    assert raw.x_train.shape == (600, 32, 32, 3) and raw.classes[7] == "class7"
    n, c, r, k = 17, 2, 5, 30
    assert raw.x_train[n, r, k, c] == data[n, c * 1024 + r * 32 + k]  # R plane, G plane, B plane, row major
    assert raw.y_train.tolist() == labels.tolist()


def test_cifar100_lt_from_torchvision_layout(tmp_path):
    splits = write_cifar100(tmp_path)
    d = load_dataset("cifar100-lt", data_root=tmp_path, imbalance_factor=6, seed=0, download=False)
    assert isinstance(d, ImageData) and d.num_classes == 100
    assert d.class_counts == lt_class_counts(100, 6, 6) and d.class_counts[0] == 6 and d.class_counts[-1] == 1
    assert torch.bincount(d.y_train, minlength=100).tolist() == d.class_counts
    data, labels = splits["train"]
    keep = longtail_indices(labels, d.class_counts, 0)
    assert torch.equal(d.x_train, torch.from_numpy(data[keep].reshape(-1, 3, 32, 32)))
    assert d.x_test.shape == (200, 3, 32, 32) and d.x_test.dtype == torch.uint8
    assert torch.bincount(d.y_test).tolist() == [2] * 100  # test set complete and balanced
    assert (d.mean, d.std) == (CIFAR_MEAN, CIFAR_STD)


def test_cifar10_lt_from_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(range(10)) * 2
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.randint(0, 256, (20, 3072)).astype(np.uint8), b"labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"n{i}".encode() for i in range(10)]}, f)
    d = load_dataset("cifar10-lt", data_root=tmp_path, imbalance_factor=10, download=False)
    assert d.class_counts == lt_class_counts(10, 10, 10) and len(d.y_test) == 20 and d.classes[3] == "n3"


def test_cifar100_npz_in_data_root(tmp_path, monkeypatch):
    write_npz(tmp_path / "cifar100.npz", train_per_class=(3,) * 100, test_per_class=1, hw=(32, 32), channels=3)
    monkeypatch.setenv("MBIB_DATA_ROOT", str(tmp_path))
    d = load_dataset("cifar100-lt", imbalance_factor=3, download=False)
    assert d.class_counts == lt_class_counts(100, 3, 3) and d.x_test.shape == (100, 3, 32, 32)
    write_npz(tmp_path / "cifar100.npz")  # 3 classes: not CIFAR-100
    with pytest.raises(DataError) as err:
        load_dataset("cifar100-lt", data_root=tmp_path, download=False)
    assert "cifar100.npz" in one_line(err)


class _RunsCode:
    def __reduce__(self):  # what a hostile pickle does: call a global with arguments on load
        return (os.system, ("echo pwned",))


def test_cifar_pickles_cannot_run_code_and_npz_is_preferred(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": _RunsCode()}, f)
    with pytest.raises(DataError) as err:
        read_cifar(tmp_path, CIFAR100)
    assert "is not allowed" in one_line(err) and "system" in one_line(err)
    # with both present, the npz (read without pickle) wins and the hostile meta file is never opened
    write_npz(tmp_path / "cifar100.npz", train_per_class=(3,) * 100, test_per_class=1, hw=(32, 32), channels=3)
    d = load_dataset("cifar100-lt", data_root=tmp_path, imbalance_factor=3, download=False)
    assert d.class_counts == lt_class_counts(100, 3, 3)


def test_cifar100_missing_is_one_line_naming_both_ways(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar100-lt", data_root=tmp_path, download=False)
    message = one_line(err)
    assert str(tmp_path) in message and "cifar-100-python" in message and "cifar100.npz" in message
    assert "MBIB_DATA_ROOT" in message


def test_mnist_missing_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist-lt", data_root=tmp_path)
    assert "mnist10k.npz" in one_line(err) and "MBIB_DATA_ROOT" in str(err.value)


# ---------------------------------------------------------------- npz

def write_npz(path: Path, train_per_class=(9, 8, 7), test_per_class=3, hw=(28, 28), channels=1, **override):
    rng = np.random.RandomState(1)
    y_train = np.concatenate([np.full(n, c) for c, n in enumerate(train_per_class)]).astype(np.int64)
    y_test = np.repeat(np.arange(len(train_per_class)), test_per_class).astype(np.int64)
    arrays = dict(x_train=rng.randint(1, 256, (len(y_train), *hw, channels)).astype(np.uint8), y_train=y_train,
                  x_test=rng.randint(1, 256, (len(y_test), *hw, channels)).astype(np.uint8), y_test=y_test,
                  classes=np.array([f"c{i}" for i in range(len(train_per_class))]))
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays


def test_npz_dataset_gray_is_padded_and_repeated(tmp_path):
    arrays = write_npz(tmp_path / "toy.npz")
    d = load_dataset(f"npz:{tmp_path / 'toy.npz'}", imbalance_factor=7, seed=0)
    assert d.class_counts == lt_class_counts(3, 7, 7) == [7, 2, 1]
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (9, 3, 32, 32)
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])  # gray repeated to RGB
    assert d.x_test[:, :, :2].eq(0).all() and d.x_test[:, :, 30:].eq(0).all() and d.x_test[:, :, :, :2].eq(0).all()
    assert torch.equal(d.x_test[:, 0, 2:30, 2:30], torch.from_numpy(arrays["x_test"][..., 0]))
    x = d.x_train.double() / 255  # statistics come from the long-tailed training set
    assert d.mean[0] == pytest.approx(x[:, 0].mean().item()) and d.std[1] == pytest.approx(x[:, 1].std(
        unbiased=False).item())


def test_corrupt_npz_names_the_file(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError) as err:
        load_dataset(f"npz:{path}")
    assert str(path) in one_line(err)


def test_damaged_npz_member_names_file_and_array(tmp_path):
    path = tmp_path / "damaged.npz"
    write_npz(path)
    blob = bytearray(path.read_bytes())
    start = blob.index(b"x_test.npy") + 200  # inside the stored (uncompressed) x_test payload
    blob[start:start + 64] = bytes(64)
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        load_dataset(f"npz:{path}")
    message = one_line(err)
    assert str(path) in message and "x_test" in message


@pytest.mark.parametrize("override, array", [
    (dict(x_train=np.zeros((24, 28, 28, 1), np.float32)), "x_train"),
    (dict(y_test=np.zeros(5, np.int64)), "y_test"),
    (dict(x_test=np.zeros((9, 28, 28), np.uint8)), "x_test"),
    (dict(y_train=np.full(24, 7, np.int64)), "y_train"),
])
def test_malformed_npz_names_file_and_array(tmp_path, override, array):
    path = tmp_path / "bad.npz"
    write_npz(path, **override)
    with pytest.raises(DataError) as err:
        load_dataset(f"npz:{path}")
    message = one_line(err)
    assert str(path) in message and array in message


def test_missing_npz_array(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((1, 2, 2, 1), np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset(f"npz:{path}")
    assert "y_train" in one_line(err) and str(path) in str(err.value)


# ---------------------------------------------------------------- real and bundled data

def test_mnist_lt_from_data_root():
    root = os.environ.get("MBIB_DATA_ROOT")
    if not root or not (Path(root) / "mnist10k.npz").is_file():
        pytest.skip("MBIB_DATA_ROOT with mnist10k.npz not set")
    d = load_dataset("mnist-lt", imbalance_factor=100, seed=0)
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape[1:] == (3, 32, 32)
    assert d.x_test.shape == (1500, 3, 32, 32) and torch.bincount(d.y_test).tolist() == [150] * 10
    assert d.class_counts == lt_class_counts(10, 713, 100)
    assert torch.bincount(d.y_train, minlength=10).tolist() == d.class_counts
    assert d.x_train[:, :, :2].eq(0).all() and torch.equal(d.x_train[:, 0], d.x_train[:, 1])


def test_digits_lt_offline_and_deterministic():
    a = load_dataset("digits-lt", imbalance_factor=10, seed=0)
    b = load_dataset("digits-lt", imbalance_factor=10, seed=0)
    c = load_dataset("digits-lt", imbalance_factor=10, seed=1)
    assert a.x_train.shape[1:] == (3, 32, 32) and a.x_train.dtype == torch.uint8 and a.x_train.max() == 255
    assert a.class_counts == lt_class_counts(10, a.class_counts[0], 10) and a.class_counts[0] == 144
    assert torch.bincount(a.y_train, minlength=10).tolist() == a.class_counts
    assert torch.bincount(a.y_test).tolist() == [30] * 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train) and torch.equal(a.y_train, c.y_train)


# ---------------------------------------------------------------- augmentation

def reference_crop_flip(x, top, left, flip, pad=4):
    out = []
    for i in range(len(x)):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, top[i]:top[i] + x.shape[2], left[i]:left[i] + x.shape[3]]
        out.append(img.flip(-1) if flip[i] else img)
    return torch.stack(out)


def test_crop_flip_matches_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    params = sample_crop_flip(64, generator=gen)
    assert set(params.top.tolist()) == set(range(9)) and params.flip.any() and not params.flip.all()
    assert torch.equal(crop_flip(x, params), reference_crop_flip(x, params.top, params.left, params.flip))


def test_crop_is_an_exact_shift_with_zero_fill():
    x = torch.randint(1, 256, (1, 3, 32, 32), dtype=torch.uint8)
    params = sample_crop_flip(1)
    params.top[:], params.left[:], params.flip[:] = 1, 7, False  # shift by (-3, +3) rows/cols
    out = crop_flip(x, params)[0]
    assert out[:, :3].eq(0).all() and out[:, :, 29:].eq(0).all()
    assert torch.equal(out[:, 3:, :29], x[0, :, :29, 3:])


def test_cifar_augment_is_crop_flip_then_normalise():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    out = cifar_augment(x, MEAN, STD, torch.Generator().manual_seed(5))
    params = sample_crop_flip(32, generator=torch.Generator().manual_seed(5))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out, normalize(crop_flip(x, params), MEAN, STD))


def test_cifar_augment_keeps_sample_order_and_flips_half():
    n = 1000
    ramp = torch.arange(1, 33, dtype=torch.uint8)
    x = ramp.expand(n, 3, 32, 32).clone()  # columns 1..32: increasing unless flipped
    x[:, 1] = torch.arange(n).remainder(200).add(1).view(n, 1, 1).to(torch.uint8)  # channel 1 tags the sample
    out = cifar_augment(x, (0.0,) * 3, (1 / 255,) * 3, torch.Generator().manual_seed(1)).round().to(torch.int64)
    assert torch.equal(out[:, 1].amax(dim=(1, 2)), x[:, 1, 0, 0].long())
    middle = out[:, 0, 16]  # a row that is never padding; columns 4..27 are never padding either
    flipped = middle[:, 4] > middle[:, 27]
    assert 400 < int(flipped.sum()) < 600


def test_normalize_values_and_channels_last():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 2, 2).contiguous()
    out = normalize(x, MEAN, STD)
    assert out[0, :, 0, 0].tolist() == pytest.approx([-2.0, -2.0, -3.0])
    assert out[0, :, 0, 1].tolist() == pytest.approx([2.0, 3.0, 7.0])
    x_cl = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out_cl = cifar_augment(x_cl, MEAN, STD)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and out_cl.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_strong_augment_on_cuda_with_a_cuda_generator():
    from mbib.data.strong_augment import strong_augment

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
    runs = [strong_augment(x, MEAN, STD, generator=torch.Generator(device="cuda").manual_seed(1)) for _ in range(2)]
    assert runs[0].device.type == "cuda" and runs[0].shape == x.shape and torch.equal(runs[0], runs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cifar_augment_on_cuda_matches_cpu():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    cpu = cifar_augment(x, MEAN, STD, torch.Generator().manual_seed(2))
    gpu = cifar_augment(x.cuda(), MEAN, STD, torch.Generator().manual_seed(2))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu)


# ---------------------------------------------------------------- batching

def shards(n, world, batch, drop_last=False, epoch=0, shuffle=True):
    x = torch.arange(n)
    out = []
    for rank in range(world):
        it = BatchIterator(x, x * 10, batch, shuffle=shuffle, seed=3, rank=rank, world_size=world,
                           drop_last=drop_last)
        it.set_epoch(epoch)
        batches = list(it)
        assert len(batches) == len(it)
        assert all(torch.equal(yb, xb * 10) for xb, yb in batches)
        out.append(torch.cat([xb for xb, _ in batches]) if batches else torch.zeros(0, dtype=torch.long))
    return out, [len(BatchIterator(x, x, batch, rank=r, world_size=world, drop_last=drop_last))
                 for r in range(world)]


def test_batch_iterator_disjoint_cover_when_divisible():
    parts, lengths = shards(96, 4, 5)
    assert len(set(lengths)) == 1 and lengths[0] == 5  # 24 samples a rank -> 5 batches
    everything = torch.cat(parts)
    assert sorted(everything.tolist()) == list(range(96))


def test_batch_iterator_pads_by_wrapping_to_equal_lengths():
    parts, lengths = shards(103, 4, 8)
    assert len(set(lengths)) == 1 and all(len(p) == 26 for p in parts)
    everything = torch.cat(parts).tolist()
    assert set(everything) == set(range(103)) and len(everything) == 104  # one wrapped duplicate


def test_batch_iterator_drop_last_trims_and_stays_disjoint():
    parts, lengths = shards(103, 4, 8, drop_last=True)
    assert lengths == [3] * 4 and all(len(p) == 24 for p in parts)
    everything = torch.cat(parts).tolist()
    assert len(set(everything)) == len(everything) == 96


def test_batch_iterator_deterministic_per_epoch():
    a, _ = shards(50, 2, 7, epoch=0)
    b, _ = shards(50, 2, 7, epoch=0)
    c, _ = shards(50, 2, 7, epoch=1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    ordered, _ = shards(10, 1, 4, shuffle=False)
    assert ordered[0].tolist() == list(range(10))


# ---------------------------------------------------------------- file lists (ImageNet-LT / iNaturalist)

def write_tree(root: Path):
    (root / "train" / "n01").mkdir(parents=True)
    Image.new("RGB", (300, 260), (255, 0, 128)).save(root / "train" / "n01" / "a.png")
    Image.new("RGB", (64, 80), (10, 200, 30)).save(root / "train" / "n01" / "b.jpg", quality=95)
    Image.new("RGB", (50, 50), (0, 0, 255)).save(root / "train" / "c.png")
    (root / "ImageNet_LT_train.txt").write_text("train/n01/a.png 0\ntrain/n01/b.jpg 0\ntrain/c.png 2\n")
    (root / "ImageNet_LT_test.txt").write_text("train/c.png 2\ntrain/n01/a.png 1\n")


def test_file_list_dataset_reads_real_images(tmp_path):
    write_tree(tmp_path)
    test = FileListDataset(tmp_path, "ImageNet_LT_test.txt", train=False)
    image, label = test[1]
    assert label == 1 and image.shape == (3, 224, 224) and image.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert image.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-3)
    train = FileListDataset(tmp_path, tmp_path / "ImageNet_LT_train.txt", train=True)
    image, label = train[1]
    assert image.shape == (3, 224, 224) and label == 0


def test_load_filelist_data_counts(tmp_path):
    write_tree(tmp_path)
    data = load_filelist_data("imagenet-lt", tmp_path)
    assert data.class_counts == [2, 0, 1] and data.num_classes == 3 and len(data.test) == 2


@pytest.mark.parametrize("content", [b"not an image", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, content):
    write_tree(tmp_path)
    bad = tmp_path / "train" / "n01" / "b.jpg"
    if content == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad.write_bytes(content)
    dataset = FileListDataset(tmp_path, "ImageNet_LT_train.txt", train=False)
    with pytest.raises(DataError) as err:
        dataset[1]
    assert str(bad) in one_line(err)


def test_missing_file_list_names_expected_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_filelist_data("inat2018", tmp_path)
    assert str(tmp_path / "iNaturalist18_train.txt") in one_line(err)


def test_relative_data_roots_are_pinned_to_absolute_paths(tmp_path, monkeypatch):
    from mbib.data.datasets import pinned_data_root

    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    assert pinned_data_root("d") == str(tmp_path / "d")  # Ray workers run in another working directory
    monkeypatch.setenv("MBIB_DATA_ROOT", "d")
    assert pinned_data_root(None) == str(tmp_path / "d")
    monkeypatch.delenv("MBIB_DATA_ROOT")
    assert pinned_data_root(None) is None
