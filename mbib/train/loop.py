"""The per-worker training function that Ray Train's TorchTrainer runs (DDP via Ray's helpers)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from mbib.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from mbib.config import TrainConfig
from mbib.train.engine import Engine, load_data
from mbib.train.fit import fit, restore


def _wrap_ddp(world_size: int):
    if world_size == 1:
        return lambda m: m
    return lambda m: ray.train.torch.prepare_model(m, move_to_device=False)


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # one intra-op thread per CPU Ray gave this worker
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    if rank != world - 1:  # the NaN test hook fires on the last worker only: the others must stop through the
        cfg.runtime.inject_nan_step = None  # all-reduced finiteness flag
    engine = Engine(cfg, load_data(cfg), device, rank=rank, world_size=world, wrap_model=_wrap_ddp(world))

    restored, state = ray.train.get_checkpoint(), None
    if restored is not None:  # this run's own latest checkpoint (a restarted worker, a resumed run)
        with restored.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
    elif cfg.runtime.resume_from:  # another machine's checkpoint of the same run
        state = load_checkpoint(cfg.runtime.resume_from, map_location=device)
    where = f"of run {cfg.run_name!r}" if restored is not None else cfg.runtime.resume_from  # a reused run name
    progress = restore(engine, state, where)  # resumes that run's checkpoint
    bar = _progress(rank, cfg, progress.start_epoch)

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(state, Path(tmp) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}")

    fit(engine, progress, report, inject_fault=restored is None, on_epoch=lambda m: _tick(bar, m))
    if bar is not None:
        bar.close()


def _progress(rank: int, cfg: TrainConfig, start: int):
    """An epoch bar on rank 0; Ray's tqdm streams it to the driver's console."""
    if rank != 0 or not cfg.runtime.show_progress:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=cfg.optim.epochs, desc=f"{cfg.loss.method} {cfg.data.dataset}")
    bar.update(start)  # Ray's tqdm has no `initial`
    return bar


def _tick(bar, metrics: dict) -> None:
    if bar is None:
        return
    bar.update(1)
    if "acc" in metrics:
        bar.set_description(f"loss {metrics.get('train_total', float('nan')):.3f} acc {metrics['acc']:.1f}")
