"""A run in this one process, without Ray or MLflow: the same Engine and epoch loop as Ray Train's workers.

For machines that lack Ray (a lent GPU with its own torch) and for long single-worker runs where Ray's own
processes would take CPU from training. The latest checkpoint is kept at one path, written atomically after
each evaluation; a run that finds it there continues from it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mbib.checkpoint import load_checkpoint, save_checkpoint
from mbib.config import TrainConfig
from mbib.console import leg_eta
from mbib.data.datasets import pinned_data_root
from mbib.train.engine import Engine, load_data
from mbib.train.fit import fit, restore


@dataclass
class PlainOutcome:
    metrics: dict[str, Any]  # the last report
    best_metrics: dict[str, Any]  # the best evaluation's report (over every leg of a continued run)
    checkpoint: Path  # the final checkpoint


def run_plain(cfg: TrainConfig, checkpoint: str | Path, device: torch.device | None = None,
              log: Callable[[str], None] = print) -> PlainOutcome:
    """Train cfg here; continue from `checkpoint` when it exists, else from runtime.resume_from, else afresh."""
    checkpoint = Path(checkpoint)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" or cfg.runtime.cpus_per_worker:  # a CPU run gets every core unless told otherwise
        torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_worker or os.cpu_count() or 1)))
    cfg.data.data_root = pinned_data_root(cfg.data.data_root)
    engine = Engine(cfg, load_data(cfg), device)
    start = checkpoint if checkpoint.is_file() else cfg.runtime.resume_from
    progress = restore(engine, load_checkpoint(start, map_location=device) if start else None, str(start))
    if start:
        log(f"continuing from {start} at epoch {progress.start_epoch}")
    last: dict[str, Any] = {}
    clock = {"t": time.perf_counter(), "leg": time.perf_counter(), "first": 0.0}

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        last.clear()
        last.update(metrics)
        if state is not None:
            save_checkpoint(state, checkpoint)

    def line(m: dict[str, Any]) -> None:
        now = time.perf_counter()
        seconds, clock["t"] = now - clock["t"], now
        done = m["epoch"] + 1 - progress.start_epoch
        clock["first"] = now if done == 1 else clock["first"]
        left = leg_eta(clock["leg"], clock["first"], now, done, cfg.optim.epochs - m["epoch"] - 1)
        acc = f" acc {m['acc']:.1f} (many {m['many']:.1f} medium {m['medium']:.1f} few {m['few']:.1f})" if "acc" in m else ""
        log(f"epoch {m['epoch'] + 1}/{cfg.optim.epochs} loss {m.get('train_total', float('nan')):.3f}{acc} "
            f"{m['images_per_s']:.0f} img/s, {seconds:.0f} s, {left} left")

    fit(engine, progress, report, inject_fault=start is None, on_epoch=line)
    final = load_checkpoint(checkpoint) if not last else {"metrics": last, "best_metrics": progress.best_metrics}
    return PlainOutcome(dict(final["metrics"]), dict(final.get("best_metrics") or final["metrics"]), checkpoint)
