"""Export a trained mbib checkpoint to one ONNX model that checks itself before it is written.

The graph takes "images" (float32 [B, 3, H, W], already normalised; B is dynamic) and returns
"logits" (the mean of the final-tap head f and the z head g, Section 4.2) and "probs" (softmax).
Class names and the preprocessing constants travel in the model's metadata_props, so a server
needs nothing but the .onnx file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mbib
from mbib.checkpoint import atomic_write, model_from_checkpoint
from mbib.errors import ConfigError, DataError, MBIBError, TrainingError
from mbib.tracking.registry import resolve_checkpoint
from mbib.tracking.runs import log_export

OPSET = 18
TOLERANCE = 1e-4  # logit difference relative to max(1, max |logit|); float32 rounding through resnet32 is ~1e-6
PROB_TOLERANCE = 1e-4  # absolute, on the softmax a served answer reports
TOP_K = 5  # the classes a served answer lists by default
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs")


class EnsembleClassifier(nn.Module):
    """The deployed prediction: ensemble logits of an MBIBNet plus their softmax."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from mbib.models import ensemble_logits

        logits = ensemble_logits(self.model(images))
        return logits, torch.softmax(logits, dim=1)


def load_parity_images(data_spec: dict[str, Any], count: int, images: torch.Tensor | None = None,
                       images_npz: str | None = None) -> tuple[torch.Tensor, str]:
    """A batch of real, normalised images for the parity check: supplied, from an npz, or the checkpoint's dataset."""
    mean = torch.tensor(data_spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    if images is not None:
        return images[:count].float(), "supplied tensor"
    if images_npz is not None:
        try:
            x = np.load(images_npz)["x_test"][:count]
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot read x_test from {images_npz} ({type(exc).__name__}): pass an npz in the project's image format") from None
        raw = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # npz stores NHWC
        source = f"npz:{images_npz}"
    else:
        from mbib.data import load_dataset

        raw = load_dataset(data_spec["dataset"]).x_test[:count]
        source = f"dataset:{data_spec['dataset']}"
    if raw.shape[1] == 1 and mean.shape[1] == 3:
        raw = raw.expand(-1, 3, -1, -1)  # grey digits are fed as three equal channels
    return (raw.float() / 255.0 - mean) / std, source


def _export_bytes(wrapper: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """ONNX bytes from the dynamo exporter, or from the TorchScript exporter when dynamo fails."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={INPUT_NAME: {0: batch}}, opset_version=OPSET, external_data=False, verbose=False)
        return program.model_proto.SerializeToString(), "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to the older exporter
        print(f"mbib export: dynamo exporter failed ({type(exc).__name__}); using the TorchScript exporter", file=sys.stderr)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), opset_version=OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}})
    return buffer.getvalue(), "torchscript"


def _topk_agrees(ref_logits: np.ndarray, logits: np.ndarray, k: int, tolerance: float) -> bool:
    """ONNX's top-k classes are PyTorch's, rank by rank; a swap passes only between classes PyTorch ties within `tolerance`."""
    ours = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    theirs = np.argsort(-ref_logits, axis=1, kind="stable")[:, :k]
    rank_values = np.take_along_axis(ref_logits, ours, 1) - np.take_along_axis(ref_logits, theirs, 1)
    return bool(np.abs(rank_values).max() <= tolerance)


def check_parity(onnx_bytes: bytes, wrapper: nn.Module, images: torch.Tensor, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch on what an answer depends on, at the full batch and at batch 1.

    Logits within `tolerance` x max(1, max |logit|) (float32 error grows with the logits' scale), the same top-k
    classes, probabilities within PROB_TOLERANCE. The report's `passed` says whether all three hold.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref_logits, ref_probs = (t.numpy() for t in wrapper(images))
    logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    one_logits, one_probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[:1].numpy()})
    max_abs_logit = float(np.abs(ref_logits).max())
    logit_bound = tolerance * max(1.0, max_abs_logit)
    k = min(TOP_K, ref_logits.shape[1])
    report = {
        "batch_size": int(images.shape[0]),
        "tolerance": tolerance,
        "max_abs_diff_logits": float(np.abs(logits - ref_logits).max()),
        "max_abs_diff_logits_batch1": float(np.abs(one_logits - ref_logits[:1]).max()),
        "max_abs_logit": max_abs_logit,
        "logit_bound": logit_bound,
        "max_abs_diff_probs": float(max(np.abs(probs - ref_probs).max(), np.abs(one_probs - ref_probs[:1]).max())),
        "prob_bound": PROB_TOLERANCE,
        "top1_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "top_k": k,
        "top_k_agrees": _topk_agrees(ref_logits, logits, k, logit_bound) and _topk_agrees(ref_logits[:1], one_logits, k, logit_bound),
        "output_shapes": {"logits": list(logits.shape), "probs": list(probs.shape)},
    }
    report["passed"] = bool(max(report["max_abs_diff_logits"], report["max_abs_diff_logits_batch1"]) <= logit_bound
                            and report["max_abs_diff_probs"] <= PROB_TOLERANCE and report["top_k_agrees"])
    return report


def parity_failure(report: dict[str, Any]) -> str:
    """The one-line reason a parity report failed."""
    worst = max(report["max_abs_diff_logits"], report["max_abs_diff_logits_batch1"])
    if worst > report["logit_bound"]:
        return (f"ONNX Runtime's logits differ from PyTorch's by {worst:.3g} > {report['logit_bound']:.3g} "
                f"(tolerance {report['tolerance']:g} x max |logit| {report['max_abs_logit']:.3g})")
    if not report["top_k_agrees"]:
        return f"ONNX Runtime's top-{report['top_k']} classes differ from PyTorch's"
    return f"ONNX Runtime's probabilities differ from PyTorch's by {report['max_abs_diff_probs']:.3g} > {PROB_TOLERANCE:g}"


def export_onnx(checkpoint_or_model_uri: str | os.PathLike, out_path: str | os.PathLike, *,
                parity_images: torch.Tensor | None = None, parity_npz: str | None = None,
                parity_count: int = 32, synthetic_parity: bool = False, noise_if_no_data: bool = False,
                tolerance: float = TOLERANCE, record: bool = True,
                mlflow_tracking_uri: str | None = None, mlflow_experiment: str | None = None) -> dict[str, Any]:
    """Export, verify (ONNX checker + ORT/PyTorch parity, see check_parity), then write atomically.

    Returns the parity report. Raises TrainingError when the check fails; nothing is written then.
    `noise_if_no_data`: check on noise when the model's data set is not on this machine (the report says which).
    `record`: log the file and report to MLflow (the active run, or a new one at the tracking URI) as `mbib export` does.
    """
    import onnx

    source = str(checkpoint_or_model_uri)
    with tempfile.TemporaryDirectory(prefix="mbib-export-") as tmp:
        ckpt_path = resolve_checkpoint(source, tmp)
        model, state = model_from_checkpoint(ckpt_path)
        version = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()[:12]
    spec, data_spec = state["model_spec"], state.get("data_spec") or {}
    missing = [k for k in ("classes", "mean", "std", "image_size") if k not in data_spec]
    if missing:
        raise DataError(f"checkpoint {ckpt_path} lacks data_spec {missing}: re-save it with mbib.train so export knows the preprocessing")
    size = int(data_spec["image_size"])
    wrapper = EnsembleClassifier(model).eval()

    generator = torch.Generator().manual_seed(0)
    noise = lambda: torch.randn(parity_count, len(data_spec["mean"]), size, size, generator=generator)  # noqa: E731
    if synthetic_parity and parity_images is None and parity_npz is None:
        images, image_source = noise(), "synthetic normal noise"
    else:
        try:
            images, image_source = load_parity_images(data_spec, parity_count, parity_images, parity_npz)
        except (DataError, ImportError) as exc:
            if not noise_if_no_data or parity_images is not None or parity_npz is not None:
                raise DataError(f"no real images for the parity check ({exc}): pass --parity-npz PATH or "
                                "--synthetic-parity") from None
            images, image_source = noise(), f"synthetic normal noise (no real images here: {exc})"
    if images.shape[0] < 2 or tuple(images.shape[2:]) != (size, size):
        raise DataError(f"parity images have shape {tuple(images.shape)}, need [>=2, C, {size}, {size}]: supply images of the model's size")

    onnx_bytes, exporter = _export_bytes(wrapper, images[:2].contiguous())
    proto = onnx.load_from_string(onnx_bytes)
    metadata = {
        "classes": json.dumps(list(data_spec["classes"])),
        "mean": json.dumps([float(v) for v in data_spec["mean"]]),
        "std": json.dumps([float(v) for v in data_spec["std"]]),
        "image_size": str(size),
        "model_name": spec["name"],
        "model_options": json.dumps(spec.get("options", {})),
        "model_version": source.rstrip("/").rsplit("/", 1)[-1] if source.startswith("models:/") else version,
        "dataset": str(data_spec.get("dataset", "")),
        "source": source,
        "checkpoint_sha256_12": version,
        "mbib_version": mbib.__version__,
        "exporter": exporter,
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    final = proto.SerializeToString()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # checker raises ValidationError and shape-inference errors
        raise TrainingError(f"exported ONNX graph fails onnx.checker ({str(exc).splitlines()[0]}): report this with the model name {spec['name']}") from None

    report = {"exporter": exporter, "opset": OPSET, "images": image_source,
              "source": source, "model_name": spec["name"], **check_parity(final, wrapper, images, tolerance)}
    if not report["passed"]:
        raise TrainingError(f"{parity_failure(report)}: nothing written; the exported graph is wrong, report it with "
                            f"the model name {spec['name']}")
    target = Path(out_path)
    atomic_write(target, lambda fh: fh.write(final))
    report["onnx_path"] = str(target)
    report["onnx_sha256"] = hashlib.sha256(final).hexdigest()
    report["mlflow_run_id"] = log_export(target, report, mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                                         mlflow_experiment) if record else None
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbib export", description="Export a checkpoint (or MLflow model URI) to a self-checked ONNX model.")
    parser.add_argument("checkpoint", help="checkpoint.pt, its directory, or models:/NAME/VERSION")
    parser.add_argument("--out", default="model.onnx", help="where to write the ONNX model (default model.onnx)")
    parser.add_argument("--parity-npz", help="npz (project image format) whose x_test feeds the parity check")
    parser.add_argument("--parity-count", type=int, default=32, help="images in the parity batch (>= 2)")
    parser.add_argument("--synthetic-parity", action="store_true", help="check parity on noise when no real images are available")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="max logit difference allowed, relative to max(1, max |logit|) (default 1e-4)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI to log the ONNX file and report to (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", help="MLflow experiment for the export run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.parity_count < 2:
            raise ConfigError(f"--parity-count {args.parity_count} is too small: use 2 or more so the batch size stays dynamic")
        if not 0 < args.tolerance < 1:
            raise ConfigError(f"--tolerance {args.tolerance:g} is out of range: use a relative tolerance in (0, 1), e.g. 1e-4")
        report = export_onnx(args.checkpoint, args.out, parity_npz=args.parity_npz, parity_count=args.parity_count,
                             synthetic_parity=args.synthetic_parity, tolerance=args.tolerance,
                             mlflow_tracking_uri=args.mlflow_uri, mlflow_experiment=args.experiment)
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
