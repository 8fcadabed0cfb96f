"""Image classification over HTTP: an exported mbib ONNX model behind a Ray Serve FastAPI ingress.

Library logic only; serve/app.py turns a config file, environment and command line into the app.
Pre-processing and the model itself: mbib.classifier.
"""

import asyncio
import os
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from mbib.classifier import CROP_FRACTION, MAX_IMAGE_PIXELS, SMALL_MODEL_MAX, ImageError, OnnxClassifier, cuda_present
from mbib.errors import ConfigError
from mbib.serving_page import page_html

DRAIN_MAX_BYTES = 256 * 1024 * 1024  # an oversized body up to this is read and dropped so the client reads the 413
ENV_PREFIX = "MBIB_SERVE_"
INLINE_DECODE_BYTES = 64 * 1024  # smaller images decode faster (~0.2 ms for 32 px) than a hop to a thread


@dataclass
class ServeSettings:
    """Everything a deployment needs; from a YAML file, MBIB_SERVE_* variables and builder args."""

    model_path: str = "model.onnx"
    num_replicas: int | None = None  # None: from the CPU count, see replicas_for
    num_cpus: float = 1.0  # per replica, and its ONNX Runtime threads; fractional on small machines so replicas fit
    num_gpus: float | None = None  # None: a GPU share per replica only when the driver sees CUDA
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0  # no wait: under load the queue fills while the model runs (bench/serve_throughput.py)
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decompression-bomb guard (width x height)
    max_batch_files: int = 64

    @classmethod
    def from_sources(cls, config_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None) -> "ServeSettings":
        """Defaults < YAML file < MBIB_SERVE_* environment < explicit overrides (e.g. `serve run ... key=value`)."""
        values: dict[str, Any] = {}
        if config_path:
            values.update(_read_yaml(Path(config_path)))
        environ = os.environ if environ is None else environ
        for f in fields(cls):
            if ENV_PREFIX + f.name.upper() in environ:
                values[f.name] = environ[ENV_PREFIX + f.name.upper()]
        values.update({k: v for k, v in (overrides or {}).items() if k != "config"})
        return cls.coerce(values)

    @classmethod
    def coerce(cls, values: Mapping[str, Any]) -> "ServeSettings":
        """Typed settings from strings or numbers; a ConfigError names an unknown or malformed key."""
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ConfigError(f"unknown serve setting {key!r}: use one of {', '.join(known)}")
            kind = {"model_path": str, "num_replicas": int, "max_batch_size": int,
                    "max_body_bytes": int, "max_image_pixels": int, "max_batch_files": int}.get(key, float)
            try:
                out[key] = None if key in ("num_gpus", "num_replicas") and raw in (None, "", "auto") else kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"serve setting {key}={raw!r} is not a valid {kind.__name__}: fix the config or flag") from None
        settings = cls(**out)
        if (settings.num_replicas or 1) < 1 or settings.max_batch_size < 1 or settings.num_cpus <= 0:
            raise ConfigError("num_replicas, max_batch_size and num_cpus must be positive: fix the serve config")
        if settings.batch_wait_timeout_s < 0:
            raise ConfigError(f"batch_wait_timeout_s={settings.batch_wait_timeout_s} is negative: use 0 or more seconds")
        return settings


def _read_yaml(path: Path) -> dict[str, Any]:
    """The `mbib` block of a Serve config (or a flat mapping) as a dict."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read serve config {path} ({type(exc).__name__}): check the path and YAML syntax") from None
    if "applications" in data:  # a full Serve config: take the first application's args
        data = data["applications"][0].get("args", {}) or {}
    return dict(data)


# ---------------------------------------------------------------- HTTP layer (Ray Serve + FastAPI)

_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "image/png": _IMAGE_BODY, "image/jpeg": _IMAGE_BODY, "image/webp": _IMAGE_BODY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

api = FastAPI(title="mbib image classifier", version="1", description="Long-tailed image classification with an exported MBIB model.")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": f"invalid {where}: {first.get('msg', 'bad request')}"}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(ImageError)
async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected still answers JSON (never Starlette's plain-text 500); the replica stays up."""
    detail = " ".join(str(exc).split())[:200]
    return JSONResponse({"error": f"internal error ({type(exc).__name__}: {detail}): retry, or report it"},
                        status_code=500)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 by its Content-Length or once more than `limit` bytes arrive.

    An oversized body is read to its end (up to DRAIN_MAX_BYTES) and dropped before the 413 goes out: a client
    that sends it all without `Expect: 100-continue` (urllib) would otherwise get a connection reset, not the JSON.
    """
    declared = request.headers.get("content-length")
    stream = request.stream()  # one iterator: Starlette refuses a second request.stream()
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= DRAIN_MAX_BYTES:
            await _drain(stream, 0)
        raise ImageError(413, f"body of {declared} bytes exceeds the {limit}-byte limit: send a smaller image")
    chunks, total = [], 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            await _drain(stream, total)
            raise ImageError(413, f"body exceeds the {limit}-byte limit: send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(stream: AsyncIterator[bytes], seen: int) -> None:
    """Read and drop the rest of a refused body, bounded: past DRAIN_MAX_BYTES the server closes instead."""
    async for chunk in stream:
        seen += len(chunk)
        if seen > DRAIN_MAX_BYTES:
            return


async def _multipart_files(request: Request, body: bytes, allowed: tuple[str, ...], max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the file parts of an already size-checked multipart body; 422 for other fields."""

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=max_files, max_fields=16).parse()
    except MultiPartException as exc:
        raise ImageError(400, f"malformed multipart body ({exc.message}): send files as multipart/form-data") from None
    unknown = sorted({key for key in form.keys() if key not in allowed})
    if unknown:
        raise ImageError(422, f"unknown form field(s) {', '.join(unknown)}: send the image in field {allowed[0]!r}")
    files = []
    for key, value in form.multi_items():
        if isinstance(value, str):
            raise ImageError(422, f"form field {key!r} is text, not a file: attach the image as a file")
        files.append((value.filename or key, await value.read()))
    if not files:
        raise ImageError(400, f"no image in the form: send it in field {allowed[0]!r}")
    return files


@serve.deployment(name="MBIBClassifier")
@serve.ingress(api)
class ClassifierDeployment:
    """One ONNX Runtime session per replica; single images from all requests batched by @serve.batch."""

    def __init__(self, settings: dict[str, Any]):
        import ray

        self.settings = ServeSettings.coerce(settings)
        Image.MAX_IMAGE_PIXELS = self.settings.max_image_pixels
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb warning is a refusal here
        self.model = OnnxClassifier(self.settings.model_path, num_threads=int(self.settings.num_cpus),
                                    use_cuda=bool(ray.get_gpu_ids()))
        self._infer.set_max_batch_size(self.settings.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()  # model calls by batch size: proof that requests are batched

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes[len(images)] += 1
        # inline: a thread hand-off costs more than the model on a busy CPU; requests keep arriving on Serve's own
        # loop meanwhile and form the next batch
        return list(self.model.probabilities(np.stack(images)))

    def _check_top_k(self, top_k: int) -> int:
        if not 1 <= top_k <= len(self.model.classes):
            raise ImageError(422, f"top_k={top_k} is out of range: use 1..{len(self.model.classes)}")
        return top_k

    async def _classify_bytes(self, data: bytes, top_k: int) -> list[dict[str, Any]]:
        if len(data) <= INLINE_DECODE_BYTES:
            x = self.model.preprocess(data, self.settings.max_image_pixels)
        else:
            x = await asyncio.to_thread(self.model.preprocess, data, self.settings.max_image_pixels)
        return self.model.top_k(await self._infer(x), top_k)

    async def _classify_file(self, name: str, data: bytes, top_k: int) -> dict[str, Any]:
        """One batch entry: predictions, or the file's own error (status + message) instead of failing the batch."""
        try:
            return {"filename": name, "predictions": await self._classify_bytes(data, top_k)}
        except ImageError as exc:
            return {"filename": name, "error": exc.message, "status": exc.status}

    @api.post("/classify", openapi_extra=_CLASSIFY_BODY, summary="Classify one image (raw body or multipart field 'file')")
    async def classify(self, request: Request, top_k: int = Query(5, description="how many labels to return")) -> dict[str, Any]:
        self._check_top_k(top_k)
        body = await _read_body(request, self.settings.max_body_bytes)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            files = await _multipart_files(request, body, ("file",), max_files=1)
            if len(files) != 1:
                raise ImageError(422, "send exactly one file in field 'file' (use /classify/batch for several)")
            body = files[0][1]
        return {"model": self.model.describe(), "predictions": await self._classify_bytes(body, top_k)}

    @api.post("/classify/batch", openapi_extra=_BATCH_BODY, summary="Classify several images (multipart fields 'files')")
    async def classify_batch(self, request: Request, top_k: int = Query(5, description="how many labels to return")) -> dict[str, Any]:
        self._check_top_k(top_k)
        body = await _read_body(request, self.settings.max_body_bytes)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ImageError(415, "send the images as multipart/form-data in fields 'files'")
        files = await _multipart_files(request, body, ("files", "file"), max_files=self.settings.max_batch_files)
        results = await asyncio.gather(*(self._classify_file(name, data, top_k) for name, data in files))
        if all("error" in r for r in results):  # nothing decodable: the request itself is bad
            first = results[0]
            raise ImageError(first["status"], f"{first['filename']}: {first['error']}"
                             + (f" (and {len(results) - 1} more file(s) failed)" if len(results) > 1 else ""))
        return {"model": self.model.describe(), "results": results}

    @api.get("/", response_class=HTMLResponse, summary="A page to try the classifier in a browser")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(page_html())

    @api.get("/healthz", summary="Liveness: the replica holds a loaded model; its batches so far")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model.describe()["name"], "providers": self.model.providers,
                "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}

    @api.get("/metadata", summary="Classes, input size, preprocessing and model source")
    async def metadata(self) -> dict[str, Any]:
        m = self.model
        return {"model": m.describe(), "classes": m.classes, "num_classes": len(m.classes),
                "input": {"name": m.input_name, "channels": m.channels, "image_size": m.image_size,
                          "mean": m.mean.tolist(), "std": m.std.tolist(),
                          "resize": "direct" if m.image_size <= SMALL_MODEL_MAX else f"shorter side {round(m.image_size / CROP_FRACTION)} + centre crop"},
                "providers": m.providers,
                "limits": {"max_body_bytes": self.settings.max_body_bytes, "max_image_pixels": self.settings.max_image_pixels,
                           "max_batch_files": self.settings.max_batch_files},
                "batching": {"max_batch_size": self.settings.max_batch_size, "batch_wait_timeout_s": self.settings.batch_wait_timeout_s}}


def replicas_for(cpus: int, gpus: int, cpus_per_replica: float, gpus_per_replica: float) -> int:
    """How many replicas fill this machine: one per GPU share, else one per CPU share beside Serve's HTTP proxy
    (one core kept for it; bench/serve_throughput.py shows the proxy's hop costs as much as the model)."""
    if gpus and gpus_per_replica:
        return max(1, round(gpus / gpus_per_replica))
    return max(1, int((cpus - 1) // max(1.0, cpus_per_replica)))


def build_app(settings: ServeSettings):
    """A Serve application for `serve.run(build_app(settings))` or `serve run serve.app:app`."""
    model_path = Path(settings.model_path).resolve()
    if not model_path.is_file():
        raise ConfigError(f"ONNX model not found: {model_path} (set model_path in serve/config.yaml or MBIB_SERVE_MODEL_PATH)")
    OnnxClassifier(model_path, use_cuda=False)  # a broken or foreign file fails here, before any replica deploys
    gpus = 0
    if cuda_present():
        import torch

        gpus = torch.cuda.device_count()
    num_gpus = settings.num_gpus
    if num_gpus is None:  # a GPU share per replica only when this machine has CUDA
        num_gpus = min(1.0, gpus / (settings.num_replicas or gpus)) if gpus else 0.0
    replicas = settings.num_replicas or replicas_for(os.cpu_count() or 1, gpus, settings.num_cpus, num_gpus)
    resolved = {**asdict(settings), "model_path": str(model_path), "num_gpus": num_gpus, "num_replicas": replicas}
    return ClassifierDeployment.options(
        num_replicas=replicas,
        max_ongoing_requests=2 * settings.max_batch_size,  # one batch in the model, the next gathering; the rest wait at the proxy
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": num_gpus},
    ).bind(resolved)
