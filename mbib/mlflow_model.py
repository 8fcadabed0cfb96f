"""A checkpoint as an MLflow Model: a pyfunc that takes encoded images and answers with the top-1 class.

Why a pyfunc over the ONNX export rather than MLflow's ONNX flavor: the ONNX flavor takes the normalised
[B, C, H, W] tensor, so every caller would re-implement the preprocessing (decode, EXIF, alpha, resize, mean/std);
this model takes PNG/JPEG/WebP bytes, runs `mbib.classifier` (what the Serve endpoint runs, so the answers are
the same) and keeps the ONNX file, the checkpoint (for `mbib export models:/...` and resuming) and the class
names beside it. `mlflow models serve -m models:/NAME/V --env-manager local` answers `/invocations` with
`{"dataframe_split": {"columns": ["image"], "data": [[<base64 image>]]}}`; the model's Python code is mbib's,
so it loads where mbib is installed.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from mbib.classifier import ImageError, OnnxClassifier
from mbib.export import export_onnx, load_parity_images

ONNX_FILE = "model.onnx"
REQUIREMENTS = ["mbib", "onnxruntime", "pillow", "numpy", "pandas"]  # mbib: this repository, pip install -e .


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame with an `image` column of encoded images -> label, index and probability per row."""

    def load_context(self, context):
        self.model = OnnxClassifier(context.artifacts["onnx"])

    # a DataFrame hint: MLflow infers no schema from it (the signature is declared) and stops asking for hints
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        column = model_input["image"] if isinstance(model_input, pd.DataFrame) else pd.Series(list(model_input))
        try:
            batch = np.stack([self.model.preprocess(_as_bytes(v)) for v in column])
        except ImageError as exc:  # the scoring server answers 400 with this line, as Serve does
            raise MlflowException(f"image {exc.message}", error_code=INVALID_PARAMETER_VALUE) from None
        probs = self.model.probabilities(batch)
        top = probs.argmax(axis=1)
        return pd.DataFrame({"label": [self.model.classes[i] for i in top], "index": top.astype(np.int64),
                             "probability": probs[np.arange(len(top)), top].astype(np.float64)})


def _as_bytes(value: Any) -> bytes:
    """Bytes as given; a base64 string (how JSON carries binary) decoded."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ImageError(400, "an image must be bytes or a base64 string") from None


def example_png(checkpoint: Path) -> tuple[bytes, str]:
    """One real image of the model's data set as PNG bytes when it is on this machine, else seeded noise."""
    import torch
    from PIL import Image

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = state.get("data_spec") or {}
    mean, std = (np.asarray(spec[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    try:
        x, source = load_parity_images(spec, 1)
        pixels, source = np.clip((x[0].numpy() * std + mean) * 255.0, 0, 255), f"a test image ({source})"
    except Exception:  # noqa: BLE001 - any reason the data is not here
        size = int(spec["image_size"])
        pixels, source = np.random.default_rng(0).uniform(0, 255, (len(mean), size, size)), "seeded noise"
    array = np.rint(pixels).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
    return buf.getvalue(), source


def save_image_model(checkpoint: str | Path, path: str | Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the MLflow Model folder for `checkpoint` at `path` (ONNX export with its parity check, signature, input
    example, classes, preprocessing, the checkpoint); returns the export's parity report."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="mbib-model-") as tmp:
        onnx = Path(tmp) / ONNX_FILE
        report = export_onnx(checkpoint, onnx, noise_if_no_data=True, record=False)  # the model is the record
        meta = OnnxClassifier(onnx).metadata
        png, example_source = example_png(checkpoint)
        signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                                   outputs=Schema([ColSpec("string", "label"), ColSpec("long", "index"),
                                                   ColSpec("double", "probability")]))
        preprocessing = ("decode PNG/JPEG/WebP, EXIF orientation, alpha over black, resize to image_size "
                         "(centre crop above 64 px), (x/255 - mean) / std; see mbib.classifier")
        mlflow.pyfunc.save_model(
            str(path), python_model=str(Path(__file__).with_name("mlflow_model_code.py")), artifacts={"onnx": str(onnx), "checkpoint": str(checkpoint)},
            signature=signature, input_example=pd.DataFrame({"image": [png]}), pip_requirements=REQUIREMENTS,
            metadata={"classes": json.loads(meta["classes"]), "image_size": int(meta["image_size"]),
                      "mean": json.loads(meta["mean"]), "std": json.loads(meta["std"]), "preprocessing": preprocessing,
                      "input_example": example_source, "onnx_parity": report["images"], **(metadata or {})})
    return report


def register_image_model(client, run_id: str, checkpoint: str | Path, name: str, *, description: str = "",
                         metadata: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
    """Log `checkpoint` as an MLflow Model under the run's `model/` artifacts and register it as a new version of
    `name`; returns the version. Through the client: mlflow.pyfunc.log_model would reopen a finished run."""
    with tempfile.TemporaryDirectory(prefix="mbib-register-") as tmp:
        save_image_model(checkpoint, Path(tmp) / "model", metadata)
        client.log_artifacts(run_id, str(Path(tmp) / "model"), artifact_path="model")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=description)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return str(client.create_model_version(name, source=source, run_id=run_id, tags=tags or {}).version)
