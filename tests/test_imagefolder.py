"""Image folders and zips in ImageFolder layout (imagefolder:PATH, cifar100.zip): fixtures built here."""

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbib.config import TrainConfig, apply_overrides
from mbib.data import index_imagefolder, load_dataset, read_imagefolder
from mbib.data.datasets import CIFAR_MEAN
from mbib.errors import DataError
from mbib.train.engine import load_data


def image_bytes(seed: int, size: int = 8, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.randint(0, 256, (size, size, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buf, fmt)
    return buf.getvalue()


def layout(counts: dict[str, dict[str, int]], size: int = 8) -> dict[str, bytes]:
    """{member path: PNG bytes} for split -> class -> number of images; pixels depend on the path."""
    files = {}
    for split, classes in counts.items():
        for cls, n in classes.items():
            for i in range(n):
                files[f"{split}/{cls}/img{i}.png"] = image_bytes(zlib.crc32(f"{split}/{cls}/{i}".encode()), size)
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], top: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(top + name, data)
    return path


TAIL = {"train": {"cat": 6, "ant": 3, "bee": 1}, "test": {"cat": 2, "ant": 2, "bee": 2}}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("kind", ["folder", "zip", "zip-with-top-folder"])
def test_image_folder_loads_as_stored_with_sorted_labels(tmp_path, kind):
    files = layout(TAIL)
    files["train/cat/img10.png"] = files.pop("train/cat/img5.png")  # numbers sort numerically: img10 last
    if kind == "folder":
        source = write_folder(tmp_path / "set", files)
    else:
        source = write_zip(tmp_path / "set.zip", files, top="myset/" if kind.endswith("folder") else "")
    d = load_dataset(f"imagefolder:{source}", imbalance_factor=None)
    assert d.classes == ["ant", "bee", "cat"]  # sorted folder names, as torchvision's ImageFolder
    assert d.class_counts == [3, 1, 6]  # as stored: a naturally long-tailed set keeps its shape
    assert d.y_train.tolist() == [0, 0, 0, 1] + [2] * 6 and torch.bincount(d.y_test).tolist() == [2, 2, 2]
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_train.dtype == torch.uint8  # 8 px padded to 32
    expected = np.array(Image.open(io.BytesIO(files["train/cat/img10.png"])).convert("RGB"))
    assert torch.equal(d.x_train[-1, :, 12:20, 12:20], torch.from_numpy(expected).permute(2, 0, 1))


def test_imbalance_factor_subsamples_an_image_folder(tmp_path):
    files = layout({"train": {c: 8 for c in "abcd"}, "test": {c: 1 for c in "abcd"}})
    d = load_dataset(f"imagefolder:{write_folder(tmp_path, files)}", imbalance_factor=8)
    assert d.class_counts == [8, 4, 2, 1]


@pytest.mark.parametrize("imbalance_factor", [8, None])
def test_decoding_only_the_kept_images_gives_the_data_of_decoding_all(tmp_path, imbalance_factor):
    from mbib.data.datasets import build_longtail

    files = layout({"train": {c: 8 for c in "abcd"}, "test": {c: 2 for c in "abcd"}})
    source = write_zip(tmp_path / "set.zip", files)
    name = f"imagefolder:{source}"
    everything = build_longtail(read_imagefolder(index_imagefolder(source)), name, imbalance_factor, seed=3)
    d = load_dataset(name, imbalance_factor=imbalance_factor, seed=3)  # decodes the kept training images only
    assert d.class_counts == everything.class_counts and d.mean == everything.mean and d.std == everything.std
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(d, key), getattr(everything, key)), key
    assert len(d.y_train) == (15 if imbalance_factor else 32)


def test_images_of_other_sizes_are_resized_to_the_model_input(tmp_path):
    files = layout({"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, size=40)
    files["train/a/gray.png"] = image_bytes(7, size=20, mode="L")
    files["train/b/alpha.png"] = image_bytes(8, size=32, mode="RGBA")
    cfg = apply_overrides(TrainConfig(), {"data.dataset": f"imagefolder:{write_folder(tmp_path, files)}",
                                          "data.imbalance_factor": None})
    d = load_data(cfg)  # resnet32 takes 32x32
    assert d.x_train.shape == (6, 3, 32, 32) and d.class_counts == [3, 3]
    gray = d.x_train[d.y_train == 0][0]  # members sort as gray.png, img0.png, img1.png
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grey became RGB
    with pytest.raises(DataError, match="differ in size") as err:
        load_dataset(f"imagefolder:{tmp_path}", imbalance_factor=None)  # no size given: one size needed
    assert "data.image_size" in one_line(err)


def test_cifar100_zip_in_data_root_is_found_after_npz(tmp_path):
    classes = [f"c{i:03d}" for i in range(100)]
    files = layout({"train": {c: 2 for c in classes}, "test": {c: 1 for c in classes}}, size=32)
    write_zip(tmp_path / "cifar100.zip", files, top="cifar100/")
    d = load_dataset("cifar100-lt", data_root=tmp_path, imbalance_factor=2, download=False)
    assert d.classes == classes and len(d.y_test) == 100 and d.mean == CIFAR_MEAN
    assert d.class_counts[0] == 2 and d.class_counts[-1] == 1


def test_bad_member_is_named(tmp_path):
    files = layout(TAIL)
    files["train/ant/broken.png"] = image_bytes(1)[:40]  # truncated
    source = write_zip(tmp_path / "set.zip", files)
    with pytest.raises(DataError, match=r"set\.zip!train/ant/broken\.png is not a decodable image") as err:
        load_dataset(f"imagefolder:{source}", imbalance_factor=None)
    one_line(err)
    files["train/ant/broken.png"] = b"not an image at all"
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(f"imagefolder:{write_folder(tmp_path / 'f', files)}", imbalance_factor=None)


def test_class_folders_that_differ_between_splits_are_listed(tmp_path):
    files = layout({"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "d": 1}})
    with pytest.raises(DataError) as err:
        index_imagefolder(write_folder(tmp_path, files))
    assert "only in train/: b, c; only in val/: d" in one_line(err)


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path, layout({"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}))
    (root / "train" / "zebra").mkdir()
    (root / "test" / "zebra").mkdir()
    (root / "train" / ".DS_Store").write_bytes(b"clutter is skipped")
    with pytest.raises(DataError, match="zebra") as err:
        index_imagefolder(root)
    assert "hold no images" in one_line(err)


@pytest.mark.parametrize("files", [{"images/a/1.png": b"x", "labels/a/1.png": b"x"},  # no split folders
                                   {"train/a/1.png": b"x"}])  # no test split
def test_unrecognised_layout_says_the_expected_one(tmp_path, files):
    with pytest.raises(DataError, match=r"expected <split>/<class>/<image>") as err:
        index_imagefolder(write_zip(tmp_path / "odd.zip", files))
    one_line(err)


def test_missing_path_and_non_zip_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        index_imagefolder(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="not a .zip"):
        index_imagefolder(tmp_path / "notes.txt")
    (tmp_path / "bad.zip").write_bytes(b"PK but not really")
    with pytest.raises(DataError, match="cannot open"):
        index_imagefolder(tmp_path / "bad.zip")


def test_decoding_matches_pillow_for_jpeg(tmp_path):
    files = {f"{s}/a/{i}.jpg": image_bytes(i, 32, fmt="JPEG") for s in ("train", "test") for i in range(3)}
    index = index_imagefolder(write_zip(tmp_path / "j.zip", files))
    raw = read_imagefolder(index, workers=2)
    for k, (member, _) in enumerate(index.train):
        reference = np.asarray(Image.open(io.BytesIO(files[member])).convert("RGB"))
        assert np.abs(raw.x_train[k].astype(int) - reference).max() <= 1  # libjpeg builds may round differently


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.environ.get("MBIB_DATA_ROOT", ""), "cifar100.zip")),
                    reason="MBIB_DATA_ROOT with cifar100.zip not set")
def test_real_cifar100_zip():
    root = os.environ["MBIB_DATA_ROOT"]
    index = index_imagefolder(os.path.join(root, "cifar100.zip"))
    assert len(index.train) == 50_000 and len(index.test) == 10_000 and len(index.classes) == 100
    assert np.bincount([y for _, y in index.train]).tolist() == [500] * 100
    assert np.bincount([y for _, y in index.test]).tolist() == [100] * 100
    d = load_dataset("cifar100-lt", data_root=root, imbalance_factor=100, download=False)
    assert len(d.y_train) == 10_847 and d.class_counts[0] == 500 and d.class_counts[-1] == 5
    assert d.classes[0] == "apple" and d.classes[-1] == "worm" and d.x_test.shape == (10_000, 3, 32, 32)


def test_lt_subset_zip_loads_the_same_long_tailed_set(tmp_path):
    """bench/lt_subset_zip.py: what it drops the long tail never picks, so the loaded data set is the same."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lt_subset_zip", Path(__file__).parents[1] / "bench" / "lt_subset_zip.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    files = layout({"train": {c: 10 for c in "abcde"}, "test": {c: 2 for c in "abcde"}})
    full = write_zip(tmp_path / "full.zip", files, top="set/")
    small = tmp_path / "small.zip"
    kept, dropped = tool.write_subset(full, small, [10.0], seed=0)
    assert (kept, dropped) == (10 + 5 + 3 + 1 + 1, 50 - 20)  # int(10 * 10^(-i/4)): 10, 5, 3, 1, 1
    assert small.stat().st_size < full.stat().st_size
    a = load_dataset(f"imagefolder:{full}", imbalance_factor=10, image_size=8)
    b = load_dataset(f"imagefolder:{small}", imbalance_factor=10, image_size=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and a.class_counts == b.class_counts
    c = load_dataset(f"imagefolder:{full}", imbalance_factor=5, image_size=8)  # an IF it was not made for differs
    d = load_dataset(f"imagefolder:{small}", imbalance_factor=5, image_size=8)
    assert not torch.equal(c.x_train, d.x_train)
    # nested subsets: one zip made for IF 2, 5 and 10 holds exactly IF 2's images and serves all three
    nested = tmp_path / "nested.zip"
    assert tool.write_subset(full, nested, [10.0, 5.0, 2.0], seed=0) == (10 + 8 + 7 + 5 + 5, 50 - 35)
    for imbalance_factor in (2, 5, 10):
        e = load_dataset(f"imagefolder:{full}", imbalance_factor=imbalance_factor, image_size=8)
        f = load_dataset(f"imagefolder:{nested}", imbalance_factor=imbalance_factor, image_size=8)
        assert torch.equal(e.x_train, f.x_train) and torch.equal(e.y_train, f.y_train)
