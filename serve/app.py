"""Ray Serve entry point in the checkout; `mbib.serve_app:app` is the same builder, importable from any directory.

    serve run serve.app:app model_path=model.onnx num_replicas=1   # builder args override MBIB_SERVE_* env
    serve run serve/config.yaml                                     # the same settings from a Serve config
    MBIB_SERVE_CONFIG=serve/config.yaml serve run serve.app:app     # settings from the `args` of a config file
"""

from mbib.serve_app import app

__all__ = ["app"]
