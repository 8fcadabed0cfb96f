"""The per-worker training function that Ray Train's TorchTrainer runs (DDP via Ray's helpers)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from mbib.checkpoint import CHECKPOINT_FILE, check_compatible, describe, load_checkpoint, load_weights, save_checkpoint
from mbib.config import TrainConfig
from mbib.train.engine import Engine, load_data


class InjectedFault(RuntimeError):
    """Raised by the fault-injection test hook to simulate a crashed worker."""


def _wrap_ddp(world_size: int):
    if world_size == 1:
        return lambda m: m
    return lambda m: ray.train.torch.prepare_model(m, move_to_device=False)


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_worker)))
    if rank != world - 1:  # the NaN test hook fires on the last worker only: the others must stop through the
        cfg.runtime.inject_nan_step = None  # all-reduced finiteness flag
    engine = Engine(cfg, load_data(cfg), device, rank=rank, world_size=world, wrap_model=_wrap_ddp(world))

    start_epoch, best = 0, -1.0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        where = f"of run {cfg.run_name!r}"  # a reused run name resumes that run's checkpoint
        check_compatible(state, engine.spec, cfg.data.dataset, where)
        load_weights(engine, state, state, f"a {cfg.loss.method} run of {describe(engine.spec, cfg.data.dataset)}", where)
        start_epoch, best = int(state["epoch"]) + 1, float(state.get("best_acc", -1.0))

    epochs = cfg.optim.epochs
    bar = _progress(rank, cfg, start_epoch)
    for epoch in range(start_epoch, epochs):
        metrics = {"epoch": epoch, **engine.run_epoch(epoch), "lr": engine.optimizer.param_groups[0]["lr"],
                   "param_checksum": engine.param_checksum()}
        is_eval = (epoch + 1) % cfg.runtime.eval_every == 0 or epoch + 1 == epochs
        if not is_eval:
            ray.train.report(metrics)
            _tick(bar, metrics)
            _inject_fault(cfg, epoch, restored)  # between two checkpoints: the restart replays this epoch
            continue
        result = engine.evaluate()
        metrics.update(result.metrics())
        best = max(best, result.acc)
        metrics["best_acc"] = best
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state = engine.state_dict()
                state.update(epoch=epoch, best_acc=best, metrics=metrics, confusion=result.confusion)
                save_checkpoint(state, Path(tmp) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")
        _tick(bar, metrics)
        _inject_fault(cfg, epoch, restored)
    if bar is not None:
        bar.close()


def _inject_fault(cfg: TrainConfig, epoch: int, restored) -> None:
    """The fault-injection test hook: crash once, in the first start only."""
    if cfg.runtime.inject_failure_epoch == epoch and restored is None:
        raise InjectedFault(f"injected fault after epoch {epoch}")


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
