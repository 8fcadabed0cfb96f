"""Checkpoints: one torch file per checkpoint, written atomically and loaded with weights_only=True.

A checkpoint dict holds
  model_spec: {"name", "num_classes", "options"}      -> rebuilds the network with build_model
  data_spec:  {"dataset", "classes", "mean", "std", "image_size", "class_counts"}
  model: state_dict; and, for resumable training, optimizer, scheduler, epoch, rng, config, metrics.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from mbib.errors import TrainingError

CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """Accept either a checkpoint file or a directory holding checkpoint.pt."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() else p


def atomic_write(target: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write to a temporary file beside the target, then rename: a crash never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
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
    return state


def model_from_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the network from a checkpoint; returns (model in eval mode, checkpoint dict)."""
    from mbib.models import build_model

    state = load_checkpoint(path, map_location)
    spec = state["model_spec"]
    model = build_model(spec["name"], spec["num_classes"], **spec.get("options", {}))
    model.load_state_dict(state["model"])
    return model.eval(), state
