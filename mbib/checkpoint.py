"""Checkpoints: one torch file per checkpoint, written atomically and loaded with weights_only=True.

A checkpoint dict holds
  model_spec: {"name", "num_classes", "options"}      -> rebuilds the network with build_model
  data_spec:  {"dataset", "classes", "mean", "std", "image_size", "class_counts"}, and "recompress" on a dosed set
  model: state_dict; and, for resumable training, optimizer, scheduler, epoch, rng, config, metrics.
  format, mbib_version: added on save; a checkpoint without `format` is format 0 (same layout, read as is).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from mbib.data.datasets import same_dataset
from mbib.data.recompress import recompress_key
from mbib.errors import TrainingError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1  # bump when the layout above changes incompatibly; load_checkpoint refuses newer ones
TMP_INFIX = ".tmp-"  # atomic_write's temporary files: `.<target name>.tmp-XXXX`


def checkpoint_file(path: str | os.PathLike) -> Path:
    """Accept either a checkpoint file or a directory holding checkpoint.pt."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() else p


def atomic_write(target: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write to a temporary file beside the target, then rename: a crash never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{TMP_INFIX}*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_INFIX}")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    from mbib import __version__

    state = {**state, "format": FORMAT, "mbib_version": __version__}
    return atomic_write(checkpoint_file(path), lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True); one-line TrainingError when it is missing or broken."""
    target = checkpoint_file(path)
    if not target.is_file():
        raise TrainingError(f"checkpoint not found: {target} (pass a checkpoint.pt file or the directory holding it)")
    try:
        state = torch.load(target, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors differ between torch releases
        raise TrainingError(f"checkpoint {target} cannot be read ({type(exc).__name__}): re-export or pick another") from None
    if not isinstance(state, dict) or "model" not in state or "model_spec" not in state:
        raise TrainingError(f"checkpoint {target} lacks model weights or model_spec: it was not written by mbib")
    if int(state.get("format", 0)) > FORMAT:
        raise TrainingError(f"checkpoint {target} has format {state['format']} from mbib {state.get('mbib_version', '?')}, "
                            f"newer than this mbib reads (format {FORMAT}): upgrade mbib")
    return state


def describe(model_spec: dict[str, Any], dataset: str | None) -> str:
    """`resnet32 (head=mbib, num_taps=3) with 10 classes on mnist-lt`: what a checkpoint or a run was built for."""
    options = ", ".join(f"{k}={v}" for k, v in sorted((model_spec.get("options") or {}).items()))
    text = f"{model_spec.get('name')}{f' ({options})' if options else ''} with {model_spec.get('num_classes')} classes"
    return text + (f" on {dataset}" if dataset else "")


def load_weights(module: Any, weights: dict[str, Any], state: dict[str, Any], target: str,
                 where: str | os.PathLike = "checkpoint") -> None:
    """load_state_dict with a one-line TrainingError naming both sides instead of torch's multi-line report.

    module: anything with load_state_dict (a network, or the training Engine); state: the checkpoint (its
    model_spec/data_spec say what it was made for); target: what it is loaded into, in words.
    """
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        first = lines[1] if len(lines) > 1 else lines[0]  # torch's first line is only "Error(s) in loading ..."
        made_for = describe(state.get("model_spec", {}), (state.get("data_spec") or {}).get("dataset"))
        raise TrainingError(f"checkpoint {where} was made for {made_for}, but is loaded into {target} "
                            f"({first.rstrip(':')}): use a checkpoint of this model, or another run name") from None


def check_compatible(state: dict[str, Any], model_spec: dict[str, Any], dataset: str, where: str | os.PathLike,
                     recompress: str = "none") -> None:
    """Refuse a checkpoint made for another architecture, head, class count, data set or data dose
    (data.recompress; a checkpoint without one was made on undosed data), in one line naming both sides."""
    data = state.get("data_spec") or {}
    theirs = (state.get("model_spec", {}), dosed_name(data.get("dataset"), data.get("recompress", "")))
    other_data = data.get("dataset") is not None and (
        not same_dataset(data["dataset"], dataset) or data.get("recompress", "") != recompress_key(recompress))
    if theirs[0] != model_spec or other_data:
        raise TrainingError(f"checkpoint {where} was made for {describe(*theirs)}, but this run is "
                            f"{describe(model_spec, dosed_name(dataset, recompress_key(recompress)))}: pick a "
                            "matching checkpoint, or another run name")


def dosed_name(dataset: str | None, dose: str) -> str | None:
    """`cifar100-lt (recompress=q50)` for a dosed set, the name alone for an undosed one."""
    return f"{dataset} (recompress={dose})" if dataset is not None and dose else dataset


def model_from_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the network from a checkpoint; returns (model in eval mode, checkpoint dict)."""
    from mbib.models import build_model

    state = load_checkpoint(path, map_location)
    spec = state["model_spec"]
    model = build_model(spec["name"], spec["num_classes"], **spec.get("options", {}))
    load_weights(model, state["model"], state, describe(spec, None) + " (its own model_spec)", checkpoint_file(path))
    return model.eval(), state
