"""An exported mbib ONNX model and its preprocessing, without any server: what Serve, the MLflow Model and the
benchmarks all run, so an image gets the same answer from each.
Pre-processing (the same in the service, the benchmark and the tests):
  decode with PIL (PNG, JPEG, WebP; first frame), apply the EXIF orientation, composite any alpha
  over black (premultiplied reading: a transparent pixel carries no light), convert to the model's
  channels, then resize: models of <= 64 px (CIFAR/MNIST style, trained on whole images) get the
  image resized directly to image_size x image_size; larger models get the shorter side resized to
  image_size / 0.875 and a centre crop of image_size (torchvision's Resize + CenterCrop that
  mbib.data.filelist evaluates with, pixel for pixel), then the stored mean/std normalisation.
"""

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mbib.errors import ConfigError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
SMALL_MODEL_MAX = 64  # image sizes up to this are resized without a crop
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # how Pillow opens 16-bit grey PNGs and TIFFs
CROP_FRACTION = 0.875  # resize-then-centre-crop ratio for ImageNet-sized models
MAX_IMAGE_PIXELS = 25_000_000  # decompression-bomb guard (width x height)


class ImageError(Exception):
    """A client error: HTTP status plus a one-line message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, max_pixels: int, target_size: int | None = None) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes fully, refusing empty, non-image, oversized and truncated input."""
    if not data:
        raise ImageError(400, "empty body: send a PNG, JPEG or WebP image")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(413, f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel limit: send a smaller image")
        if image.format not in ALLOWED_FORMATS:
            raise ImageError(415, f"unsupported image format {image.format}: send PNG, JPEG or WebP")
        if target_size and image.format == "JPEG":
            image.draft(None, (target_size, target_size))  # decode big JPEGs at a reduced scale, still >= target
        image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(413, f"image exceeds the {max_pixels}-pixel decompression limit: send a smaller image") from None
    except UnidentifiedImageError:
        raise ImageError(415, "body is not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(400, f"image is truncated or corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return image


def decode_size(size: int) -> int:
    """The shorter side the model's resize asks for (a JPEG may be decoded at a reduced scale down to it)."""
    return size if size <= SMALL_MODEL_MAX else round(size / CROP_FRACTION)


def resize_for_model(image: Image.Image, size: int) -> Image.Image:
    """Small models: direct resize; large models: torchvision's Resize(size/0.875) + CenterCrop(size) exactly
    (the longer side truncated, crop offsets rounded, as the training data's evaluation transform does)."""
    if size <= SMALL_MODEL_MAX:
        return image.resize((size, size), Image.Resampling.BILINEAR)
    width, height = image.size
    short = decode_size(size)
    new = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    resized = image.resize(new, Image.Resampling.BILINEAR)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return resized.crop((left, top, left + size, top + size))


def to_model_input(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray, channels: int = 3) -> np.ndarray:
    """float32 [C, size, size], normalised, from any PIL mode and size."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not reject an otherwise fine image
        pass
    if image.mode in SIXTEEN_BIT_GREY:  # Pillow's convert would clip every value above 255 to white
        wide = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    image = resize_for_model(image.convert("RGB" if channels == 3 else "L"), size)
    x = np.asarray(image, dtype=np.float32) / 255.0
    if x.ndim == 2:
        x = x[:, :, None]
    return ((x - mean) / std).transpose(2, 0, 1).astype(np.float32, copy=True)


def cuda_present() -> bool:
    """Whether this process sees a CUDA device (torch's check; never asks ORT, which logs loudly without one)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_providers(use_cuda: bool) -> list[str]:
    import onnxruntime as ort

    if use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxClassifier:
    """An exported mbib ONNX model with its preprocessing, read from the model's metadata."""

    def __init__(self, model_path: str | os.PathLike, num_threads: int = 1, use_cuda: bool | None = None):
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise ConfigError(f"ONNX model not found: {path} (export one with `mbib export CHECKPOINT --out {path.name}`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(num_threads))  # the replica's CPU share, not every core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.providers = choose_providers(cuda_present() if use_cuda is None else use_cuda)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # ONNX Runtime raises its own types, with multi-line messages
            detail = " ".join(str(exc).split())[:200]
            raise ConfigError(f"{path} is not a loadable ONNX model ({type(exc).__name__}: {detail}): "
                              "export one with `mbib export`") from None
        inputs, outputs = self.session.get_inputs(), {o.name for o in self.session.get_outputs()}
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or "probs" not in outputs:
            raise ConfigError(f"{path} is not an mbib export (one [B, C, H, W] input and a `probs` output): "
                              "export it with `mbib export`")
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: list[str] = json.loads(meta["classes"])
            self.mean = np.asarray(json.loads(meta["mean"]), dtype=np.float32)
            self.std = np.asarray(json.loads(meta["std"]), dtype=np.float32)
            self.image_size = int(meta["image_size"])
        except (KeyError, ValueError):
            raise ConfigError(f"{path} lacks mbib metadata (classes/mean/std/image_size): export it with `mbib export`") from None
        self.metadata = dict(meta)
        self.channels = int(self.session.get_inputs()[0].shape[1])
        self.input_name = self.session.get_inputs()[0].name

    def preprocess(self, data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        image = decode_image(data, max_pixels, decode_size(self.image_size))
        return to_model_input(image, self.image_size, self.mean, self.std, self.channels)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """probs [B, K] for a float32 [B, C, H, W] batch."""
        return self.session.run(["probs"], {self.input_name: batch})[0]

    def top_k(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"index": int(i), "label": self.classes[i], "probability": float(probs[i])} for i in order]

    def describe(self) -> dict[str, Any]:
        meta = self.metadata
        return {"name": meta.get("model_name", "unknown"), "version": meta.get("model_version", "unknown"),
                "source": meta.get("source", ""), "dataset": meta.get("dataset", ""),
                "mbib_version": meta.get("mbib_version", ""), "exporter": meta.get("exporter", "")}
