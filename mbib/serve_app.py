"""The Ray Serve application builder, importable from anywhere mbib is installed.

    serve run mbib.serve_app:app model_path=model.onnx num_replicas=1   # builder args override MBIB_SERVE_* env
    serve run mbib.serve_app:app model_path=models:/mbib-digits-lt-if10/1  # a registered model, exported once
    MBIB_SERVE_CONFIG=serve/config.yaml serve run mbib.serve_app:app     # settings from the `args` of a config file

`serve.app:app` (the checkout's serve/ folder) is the same builder. `serve run` builds before it starts Ray, so the
builder picks the ingress (`mbib.ingress`: HAProxy where installed; RAY_SERVE_ENABLE_HA_PROXY=0 for Ray's proxy).
From Python, call `mbib.ingress.prepare_ingress()` before `ray.init`, then
`serve.run(mbib.serving.build_app(ServeSettings(model_path="model.onnx")))`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from mbib.errors import MBIBError
from mbib.ingress import prepare_ingress
from mbib.serving import ServeSettings, build_app
from mbib.tracking.registry import MLFLOW_SCHEMES


def app(args: dict):
    """Application builder: defaults < MBIB_SERVE_CONFIG file < MBIB_SERVE_* env < `key=value` args."""
    config = args.get("config") or os.environ.get("MBIB_SERVE_CONFIG")
    prepare_ingress()  # the Ray `serve run` starts next reads it (no effect on a Ray already running)
    try:
        settings = ServeSettings.from_sources(config, args)
        if settings.model_path.startswith(MLFLOW_SCHEMES):
            settings = replace(settings, model_path=str(registered_onnx(settings.model_path)))
        return build_app(settings)
    except MBIBError as exc:
        if _in_ray_task():  # `serve run CONFIG.yaml` builds in a Ray task, where SystemExit kills the worker and
            raise RuntimeError(f"error: {exc}") from None  # hides the reason: `serve status` shows this line
        raise SystemExit(f"error: {exc}") from None  # `serve run mbib.serve_app:app` builds before starting Ray


def registered_onnx(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ONNX export of an MLflow model URI (models:/NAME/V, runs:/...), made once and kept in the cache.

    Registered versions do not change, so a cached export is reused; runs:/ and mlflow-artifacts:/ URIs too (an
    artifact path is written once). The store is MLFLOW_TRACKING_URI's, and the export is logged there, as
    `mbib export` does."""
    from mbib.export import export_onnx

    cache = Path(cache_dir or os.environ.get("MBIB_CACHE_DIR") or Path.home() / ".cache" / "mbib") / "serve"
    target = cache / (uri.replace(":/", "-").strip("/").replace("/", "-") + ".onnx")
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    export_onnx(uri, target, noise_if_no_data=True)
    return target


def _in_ray_task() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None
