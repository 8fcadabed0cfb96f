"""Ray Serve entry point.

    serve run serve.app:app model_path=model.onnx num_replicas=1   # builder args override MBIB_SERVE_* env
    serve run serve/config.yaml                                     # the same settings from a Serve config
    MBIB_SERVE_CONFIG=serve/config.yaml serve run serve.app:app     # settings from the `args` of a config file

From Python: `serve.run(mbib.serving.build_app(ServeSettings(model_path="model.onnx")))`.
"""

from mbib.errors import MBIBError
from mbib.serving import ServeSettings, build_app


def app(args: dict):
    """Application builder: defaults < MBIB_SERVE_CONFIG file < MBIB_SERVE_* env < `key=value` args."""
    import os

    config = args.get("config") or os.environ.get("MBIB_SERVE_CONFIG")
    try:
        return build_app(ServeSettings.from_sources(config, args))
    except MBIBError as exc:
        if _in_ray_task():  # `serve run CONFIG.yaml` builds in a Ray task, where SystemExit kills the worker and
            raise RuntimeError(f"error: {exc}") from None  # hides the reason: `serve status` shows this line
        raise SystemExit(f"error: {exc}") from None  # `serve run serve.app:app` builds before starting Ray


def _in_ray_task() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None
