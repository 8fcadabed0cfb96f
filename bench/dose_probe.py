"""How large is each data dose (mbib.data.recompress) beside the compression the shared CIFAR-100 copy already had?

No lossless CIFAR-100 reaches these machines, so the first compression (Pillow JPEG quality 75, 4:2:0) is measured on
stand-ins: lossless colour photos bundled with scikit-image, cut into random squares and downsampled to 32x32 as
CIFAR's images were. Each dose is then measured on those tiles and on the real (already JPEG) test images, whose
numbers must agree with the tiles' for the stand-ins to mean anything. PSNR in dB of the pooled squared error, in RGB
and in Pillow's YCbCr (Y, then Cb and Cr together).

    pip install scikit-image && MBIB_DATA_ROOT=../shared/data python bench/dose_probe.py [--tiles 4000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mbib.data.recompress import jpeg_round, recompress_images

PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "motorcycle_right")  # lossless colour photos in skimage
OUT = Path(__file__).resolve().parent / "results" / "dose_probe.json"
FIRST_QUALITY = 75  # Pillow's default, 4:2:0: the conversion the shared copy's README names


def tiles(count: int, blur: float, seed: int = 0) -> np.ndarray:
    """`count` 32x32 RGB tiles: random squares (64 px to the photo's short side) of the photos, Lanczos-downsampled,
    then Gaussian-blurred by `blur` px (0: none): photos downsampled this far are sharper than CIFAR's images."""
    from PIL import ImageFilter

    import skimage

    rng = np.random.default_rng(seed)
    folder = Path(skimage.__file__).parent / "data"  # the PNGs the wheel bundles (its other images are downloads)
    photos = [np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for name in PHOTOS]
    out = np.empty((count, 32, 32, 3), np.uint8)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(64, min(photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, n - side + 1)) for n in photo.shape[:2])
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        tile = crop.resize((32, 32), Image.Resampling.LANCZOS)
        out[i] = np.asarray(tile.filter(ImageFilter.GaussianBlur(blur)) if blur else tile, dtype=np.uint8)
    return out


def psnr(mse: float) -> float:
    return 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf


def ycbcr(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).convert("YCbCr")) for im in images]).astype(np.float64)


def distance(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """PSNR of b against a: RGB, Y, and Cb/Cr pooled."""
    ya, yb = ycbcr(a), ycbcr(b)
    rgb = float(np.mean((a.astype(np.float64) - b) ** 2))
    y, c = float(np.mean((ya[..., 0] - yb[..., 0]) ** 2)), float(np.mean((ya[..., 1:] - yb[..., 1:]) ** 2))
    return {"rgb_db": round(psnr(rgb), 2), "y_db": round(psnr(y), 2), "cbcr_db": round(psnr(c), 2)}


def real_test_images(root: str | None, limit: int) -> np.ndarray | None:
    from mbib.data.imagefolder import index_imagefolder, read_imagefolder

    zip_path = Path(root or "") / "cifar100.zip"
    if not root or not zip_path.is_file():
        return None
    return read_imagefolder(index_imagefolder(zip_path)).x_test[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4000)
    parser.add_argument("--blur", type=float, nargs="+", default=[0.0, 0.5, 0.7], help="stand-in blurs to try (px)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("skimage") is None:  # the stand-in photos
        print("error: the stand-in photos come with scikit-image: pip install scikit-image", file=sys.stderr)
        return 2
    result: dict = {"tiles": args.tiles, "photos": list(PHOTOS)}
    for blur in args.blur:
        clean = tiles(args.tiles, blur)
        first = np.stack([jpeg_round(image, FIRST_QUALITY) for image in clean])
        second = recompress_images(first, "q50")
        result[f"stand-ins, blur {blur:g}"] = {
            "first: q75 of lossless": distance(clean, first),
            "q50 dose of the q75 images": distance(first, second),
            "chroma dose of the q75 images": distance(first, recompress_images(first, "chroma")),
            "q75 then q50, of lossless": distance(clean, second)}
    real = real_test_images(os.environ.get("MBIB_DATA_ROOT"), args.tiles)
    if real is not None:  # the doses on the real images: the stand-ins whose doses match these are the fair ones
        result["real CIFAR-100 test"] = {"q50 dose": distance(real, recompress_images(real, "q50")),
                                         "chroma dose": distance(real, recompress_images(real, "chroma"))}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for group, values in result.items():
        for name, value in values.items() if isinstance(values, dict) else ():
            if isinstance(value, dict):
                print(f"{group:>22}  {name:<30} RGB {value['rgb_db']:5.1f} dB  Y {value['y_db']:5.1f}  "
                      f"CbCr {value['cbcr_db']:5.1f}")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
