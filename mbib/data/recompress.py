"""Data doses (`data.recompress`): degrade every image of a data set once more, to price what its compression costs.

Applied once when the data set is built (`mbib.data.datasets.build_longtail`), to the long-tailed training images
and the whole test set alike, image by image in their order, so the long tail (chosen from the labels alone) keeps
the same images and only their pixels change; the shape, dtype, labels and order stay. Not per epoch: every epoch
sees the same dosed pixels.

- `none`: the images as read (the default; nothing is touched).
- `q50`: each image encoded as JPEG once more with Pillow at quality 50 and 4:2:0 chroma subsampling
  (`subsampling=2`), then decoded back with Pillow: a luma and chroma dose. The shared CIFAR-100 copy is already
  JPEG quality 75, 4:2:0 (shared/data/README.md), so this is a second, harsher round of the same loss.
- `chroma`: a chroma-only dose: each image converted to YCbCr (Pillow's JFIF conversion, the one its JPEG encoder
  uses), Cb and Cr downsampled by 2 in each direction and upsampled back to the image's size, Y left as it is,
  and converted back to RGB. The filters are the ones a 4:2:0 JPEG round applies, without its quantisation:
  down with Pillow's BOX filter (for an even size exactly the mean of each 2x2 block, what libjpeg's h2v2
  downsampling computes when it encodes 4:2:0), up with Pillow's BILINEAR (for a 2x enlargement the 3/4-1/4
  triangle filter with edge pixels repeated, what libjpeg's default "fancy" h2v2 upsampling computes when it
  decodes). So `chroma` is the chroma half of `q50`'s subsampling alone: one more 4:2:0 pass, no quantisation
  of Y or of the chroma. Y is untouched in YCbCr; back in 8-bit RGB it comes back within rounding, except where
  the new chroma puts a colour outside the RGB cube and a channel is clipped.

Grayscale (1-channel) images have no chroma: `q50` encodes them as grayscale JPEG, `chroma` refuses them.
"""

from __future__ import annotations

import io

import numpy as np

from mbib.errors import ConfigError, DataError

RECOMPRESS = ("none", "q50", "chroma")
Q50_QUALITY = 50
SUBSAMPLING_420 = 2  # Pillow's code for 4:2:0


def check_recompress(value: str) -> str:
    """The value if it names a dose, else a one-line ConfigError naming the allowed values."""
    if value not in RECOMPRESS:
        raise ConfigError(f"data.recompress must be one of {', '.join(RECOMPRESS)}, got {value!r}")
    return value


def recompress_key(value: str) -> str:
    """The dose as it enters a data set's identity (checkpoints, MLflow's dataset digest): "" for none, so the
    identity of undosed data stays what it was before the option existed."""
    return "" if check_recompress(value) == "none" else value


def recompress_images(images: np.ndarray, value: str) -> np.ndarray:
    """uint8 [N,H,W,C] (C = 1 or 3) dosed by `value` (see the module doc); `none` returns `images` itself."""
    check_recompress(value)
    if value == "none":
        return images
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"data.recompress={value} takes uint8 images [N,H,W,1 or 3], got {images.dtype} "
                        f"{list(images.shape)}")
    if value == "chroma" and images.shape[-1] != 3:
        raise DataError("data.recompress=chroma needs colour images: a grayscale data set has no chroma to dose "
                        "(use q50, or none)")
    dose = jpeg_q50 if value == "q50" else chroma_pass
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = dose(image).reshape(image.shape)
    return out


def jpeg_q50(image: np.ndarray) -> np.ndarray:
    """One HWC uint8 image through a Pillow JPEG round at quality 50, 4:2:0, decoded back."""
    return jpeg_round(image, Q50_QUALITY)


def jpeg_round(image: np.ndarray, quality: int) -> np.ndarray:
    """One HWC uint8 image (C = 1 or 3) encoded by Pillow as JPEG at `quality`, 4:2:0, and decoded back."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        buf, format="JPEG", quality=quality, subsampling=SUBSAMPLING_420)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("L" if image.shape[-1] == 1 else "RGB"), dtype=np.uint8)


def chroma_pass(image: np.ndarray) -> np.ndarray:
    """One HWC uint8 RGB image with Cb and Cr box-downsampled by 2 and bilinearly upsampled back, Y untouched."""
    from PIL import Image

    y, cb, cr = Image.fromarray(image).convert("YCbCr").split()
    size, half = cb.size, ((cb.size[0] + 1) // 2, (cb.size[1] + 1) // 2)
    cb, cr = (c.resize(half, Image.Resampling.BOX).resize(size, Image.Resampling.BILINEAR) for c in (cb, cr))
    return np.asarray(Image.merge("YCbCr", (y, cb, cr)).convert("RGB"), dtype=np.uint8)
