"""Shared by test_export.py and test_serve.py: a resnet32 MBIB trained for a few steps on scikit-learn's bundled
digits (the `digits-lt` data set's pixels), so the tests need no data root and run on any machine."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mbib.checkpoint import save_checkpoint
from mbib.data.digits import read_digits
from mbib.models import build_model

DATASET = "digits-lt"  # export's parity check reloads the checkpoint's data set: bundled, always offline


@lru_cache(maxsize=1)
def _raw():
    return read_digits()


def digits(count: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, 32, 32] digits (grey repeated, as mbib.data does), spread over the split, and labels."""
    x_all, y_all = getattr(_raw(), f"x_{split}"), getattr(_raw(), f"y_{split}")
    pick = slice(None, None, max(1, len(x_all) // count))
    x = torch.from_numpy(x_all[pick][:count]).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(y_all[pick][:count])


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def train_tiny_checkpoint(run_dir: Path, steps: int = 4) -> Path:
    """run_dir/checkpoint.pt after a few SGD steps of cross-entropy on every head (non-tied predictions)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x, y = digits(256)
    mean, std = [x.float().div(255).mean().item()] * 3, [x.float().div(255).std().item()] * 3
    model = build_model("resnet32", 10, head="mbib")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        idx = torch.arange(step * 32, (step + 1) * 32) % len(x)
        outputs = model(normalise(x[idx], mean, std))
        loss = sum(F.cross_entropy(logits, y[idx]) for logits in outputs.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():  # exact BatchNorm statistics: a few steps leave the running averages far off
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model(normalise(x, mean, std))
    state = {"model": model.state_dict(),
             "model_spec": {"name": "resnet32", "num_classes": 10, "options": {"head": "mbib"}},
             "data_spec": {"dataset": DATASET, "classes": [str(i) for i in range(10)], "mean": mean, "std": std,
                           "image_size": 32, "class_counts": torch.bincount(y, minlength=10).tolist()}}
    return save_checkpoint(state, run_dir)


def write_parity_npz(path: Path, count: int = 16) -> Path:
    """Real test digits in the project's npz layout (NHWC) for export's parity check."""
    x, y = digits(count, "test")
    np.savez(path, x_test=x.permute(0, 2, 3, 1).numpy(), y_test=y.numpy())
    return path


def listener_name(port: int) -> str | None:
    """The name of the process listening on 127.0.0.1/0.0.0.0:`port` (Linux /proc), None when none is or not Linux."""
    import os

    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # local address hex "IP:PORT", state 0A = LISTEN, inode
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc") if inodes else []):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return open(f"/proc/{pid}/comm").read().strip()
        except OSError:  # a process that ended, or one we may not read
            continue
    return None
