"""data.recompress: the data doses (mbib.data.recompress) on synthetic images, their place in the data set's build
and identity, and the one-line error of a bad value. The real CIFAR-100 zip is used only by an optional check."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbib.checkpoint import check_compatible
from mbib.config import TrainConfig, apply_overrides, resolve_config
from mbib.data import load_dataset
from mbib.data.recompress import RECOMPRESS, recompress_images, recompress_key
from mbib.data.source import data_spec
from mbib.errors import ConfigError, DataError, TrainingError
from mbib.tracking import dataset_source
from mbib.train.engine import load_data

SHARED_ZIP = Path(os.environ.get("MBIB_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data") / \
    "cifar100.zip"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def natural_like(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Smooth colour images with texture, inside the RGB cube's interior (no dose clips them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, size=(3, 2))
        planes = [0.5 + 0.25 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + rng.uniform(0, 6)) for c in range(3)]
        img = np.stack(planes, -1) * 200 + 28 + rng.normal(0, 6, (size, size, 3))
        out.append(np.clip(img, 0, 255).round().astype(np.uint8))
    return np.stack(out)


def chroma_noise(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Images whose chroma changes pixel to pixel (what a 4:2:0 pass must smooth), Y a gentle gradient, in gamut."""
    rng = np.random.default_rng(seed)
    y = np.broadcast_to(100 + 60 * np.mgrid[0:size, 0:size][1] / size, (size, size))
    out = []
    for _ in range(n):
        planes = [y, 128 + rng.uniform(-25, 25, (size, size)), 128 + rng.uniform(-25, 25, (size, size))]
        ycc = Image.fromarray(np.stack(planes, -1).round().astype(np.uint8), "YCbCr")
        out.append(np.asarray(ycc.convert("RGB")))
    return np.stack(out)


def ycbcr(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(i).convert("YCbCr")) for i in images]).astype(np.int64)


def by_hand_q50(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=50, subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def write_npz(path: Path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    y_train = np.repeat(np.arange(4), 12)[rng.permutation(48)]
    np.savez(path, x_train=natural_like(48, seed), y_train=y_train, x_test=natural_like(8, seed + 1),
             y_test=np.repeat(np.arange(4), 2), classes=np.array(["a", "b", "c", "d"]))
    return f"npz:{path}"


# ---------------------------------------------------------------- the doses on arrays

def test_none_is_the_identity():
    x = natural_like(3)
    assert recompress_images(x, "none") is x


def test_q50_equals_a_pil_jpeg_round_at_quality_50_420_image_by_image():
    x = natural_like(6)
    out = recompress_images(x, "q50")
    assert out.shape == x.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.stack([by_hand_q50(i) for i in x]))
    assert np.abs(out.astype(int) - x).mean() > 1  # the dose changes pixels
    # and is that recipe, not another JPEG round: quality 75 or 4:4:4 give other pixels
    for other in ({"quality": 75, "subsampling": 2}, {"quality": 50, "subsampling": 0}):
        buf = io.BytesIO()
        Image.fromarray(x[0]).save(buf, format="JPEG", **other)
        assert not np.array_equal(out[0], np.asarray(Image.open(buf).convert("RGB")))


def test_chroma_keeps_luma_and_smooths_cb_cr_with_box_down_and_bilinear_up():
    x = chroma_noise(4)
    out = recompress_images(x, "chroma")
    assert out.shape == x.shape and out.dtype == np.uint8
    before, after = ycbcr(x), ycbcr(out)
    assert np.abs(after[..., 0] - before[..., 0]).max() <= 1  # Y: 8-bit RGB rounding only
    assert np.abs(after[..., 1:] - before[..., 1:]).mean() > 5  # Cb and Cr change
    # the filters the docstring names: the mean of each 2x2 block, then the 3/4-1/4 triangle up, edges repeated
    blocks = before[..., 1:].reshape(4, 16, 2, 16, 2, 2).mean(axis=(2, 4))

    def up(a, axis):
        a = np.moveaxis(a, axis, 0)
        padded = np.concatenate([a[:1], a, a[-1:]])
        out = np.empty((2 * len(a), *a.shape[1:]))
        out[0::2] = 0.75 * padded[1:-1] + 0.25 * padded[:-2]
        out[1::2] = 0.75 * padded[1:-1] + 0.25 * padded[2:]
        return np.moveaxis(out, 0, axis)

    expected = up(up(blocks, 1), 2)
    assert np.abs(after[..., 1:] - expected).max() <= 2  # rounding in each step and in the RGB round trip


def test_chroma_on_smooth_images_moves_luma_by_rounding_only():
    x = natural_like(8, seed=3)
    before, after = ycbcr(x), ycbcr(recompress_images(x, "chroma"))
    assert np.abs(after[..., 0] - before[..., 0]).max() <= 1
    assert not np.array_equal(after[..., 1:], before[..., 1:])


def test_gray_images_take_q50_but_not_chroma():
    gray = natural_like(2)[..., :1]
    out = recompress_images(gray, "q50")
    assert out.shape == gray.shape and out.dtype == np.uint8 and not np.array_equal(out, gray)
    with pytest.raises(DataError) as err:
        recompress_images(gray, "chroma")
    assert "grayscale" in one_line(err)


def test_a_bad_value_names_the_allowed_ones_in_one_line():
    for call in (lambda: resolve_config("cifar100-lt", {"data.recompress": "q75"}),
                 lambda: apply_overrides(TrainConfig(), {"data.recompress": "Q50"}),
                 lambda: recompress_images(natural_like(1), "jpeg")):
        with pytest.raises(ConfigError) as err:
            call()
        assert "data.recompress must be one of none, q50, chroma" in one_line(err)


def test_the_option_is_a_typed_setting_defaulting_to_none():
    assert TrainConfig().data.recompress == "none" and RECOMPRESS == ("none", "q50", "chroma")
    assert resolve_config("cifar100-lt", {"data.recompress": "chroma"}).data.recompress == "chroma"


# ---------------------------------------------------------------- the dose in the built data set

def test_load_dataset_doses_once_keeping_shape_labels_order_and_long_tail(tmp_path):
    name = write_npz(tmp_path / "set.npz")
    plain = load_dataset(name, imbalance_factor=4, seed=1)
    for dose in ("q50", "chroma"):
        dosed = load_dataset(name, imbalance_factor=4, seed=1, recompress=dose)
        assert dosed.recompress == dose and plain.recompress == "none"
        assert dosed.x_train.shape == plain.x_train.shape and dosed.x_train.dtype == plain.x_train.dtype
        assert dosed.class_counts == plain.class_counts
        assert dosed.y_train.tolist() == plain.y_train.tolist() and dosed.y_test.tolist() == plain.y_test.tolist()
        for split in ("x_train", "x_test"):  # the same images in the same order, each dosed
            kept = getattr(plain, split).permute(0, 2, 3, 1).numpy()
            got = getattr(dosed, split).permute(0, 2, 3, 1).numpy()
            assert not np.array_equal(got, kept)
            np.testing.assert_array_equal(got, recompress_images(kept, dose))


def test_the_engine_loads_the_configured_dose_and_refuses_it_for_file_read_sets(tmp_path):
    name = write_npz(tmp_path / "set.npz")
    cfg = resolve_config("cifar100-lt", {"data.dataset": name, "data.imbalance_factor": 2, "data.recompress": "q50"})
    assert load_data(cfg).recompress == "q50"
    with pytest.raises(ConfigError) as err:
        load_data(resolve_config("imagenet-lt", {"data.recompress": "q50"}))
    assert "data.recompress=q50 needs an in-memory data set" in one_line(err)


# ---------------------------------------------------------------- the dose in the data set's identity

def test_the_identity_key_differs_per_value_and_none_keeps_the_old_one():
    keys = [recompress_key(v) for v in RECOMPRESS]
    assert keys[0] == "" and len(set(keys)) == len(RECOMPRESS)
    sources = [dataset_source(resolve_config("cifar100-lt", {"data.recompress": v}).data) for v in RECOMPRESS]
    assert "recompress" not in sources[0] and len({str(sorted(s.items())) for s in sources}) == len(RECOMPRESS)


def test_a_checkpoint_of_other_doses_is_refused(tmp_path):
    name = write_npz(tmp_path / "set.npz")
    spec = {"name": "resnet32", "num_classes": 4, "options": {}}
    states = {v: {"model_spec": spec, "data_spec": data_spec(load_dataset(name, imbalance_factor=2, recompress=v))}
              for v in RECOMPRESS}
    assert "recompress" not in states["none"]["data_spec"]  # undosed checkpoints look as they always did
    for made in RECOMPRESS:
        for run in RECOMPRESS:
            if made == run:
                check_compatible(states[made], spec, name, "ckpt", run)
                continue
            with pytest.raises(TrainingError) as err:
                check_compatible(states[made], spec, name, "ckpt", run)
            assert (f"(recompress={made})" if made != "none" else f"(recompress={run})") in one_line(err)


# ---------------------------------------------------------------- optional: the real CIFAR-100 JPEGs

@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason="shared/data/cifar100.zip is not here")
def test_on_real_cifar100_jpegs_chroma_is_the_milder_dose_and_keeps_luma():
    import dataclasses

    from mbib.data.imagefolder import index_imagefolder, read_imagefolder

    index = index_imagefolder(SHARED_ZIP)
    x = read_imagefolder(dataclasses.replace(index, train=index.train[:1], test=index.test[::50]), 32, workers=1).x_test
    y0 = ycbcr(x)
    q50, chroma = ycbcr(recompress_images(x, "q50")), ycbcr(recompress_images(x, "chroma"))
    assert (np.abs(chroma[..., 0] - y0[..., 0]) <= 1).mean() > 0.98  # clipped saturated colours aside
    assert np.abs(q50[..., 0] - y0[..., 0]).mean() > 1
    assert 0 < np.abs(chroma[..., 1:] - y0[..., 1:]).mean() < np.abs(q50[..., 1:] - y0[..., 1:]).mean()
