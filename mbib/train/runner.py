"""Driver side of a training run: a TorchTrainer with fault tolerance, MLflow tracking and a final summary."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from mbib import tracking
from mbib.tracking import runs
from mbib.checkpoint import CHECKPOINT_FILE, atomic_write
from mbib.config import TrainConfig
from mbib.data.datasets import pinned_data_root, pinned_dataset
from mbib.data.split import SELECT_METRIC
from mbib.errors import ConfigError, MBIBError, TrainingError
from mbib.raylocal import ensure_ray
from mbib.train.engine import load_data
from mbib.train.loop import train_loop_per_worker


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]  # the last report
    best_metrics: dict[str, Any]
    best_checkpoint: Path | None  # checkpoint.pt of the best evaluation
    run_dir: Path
    mlflow_run_id: str | None
    tracking_uri: str | None


class MLflowReportCallback(ray.train.UserCallback):
    """Runs in the Train controller: logs each report as one MLflow step, so a single process writes."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.logged: set[int] = set()  # epochs already logged: a restarted worker group replays the epochs after
        # its last checkpoint, and MLflow would keep both values of a step

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        epoch = int(m.get("epoch", 0))
        if epoch in self.logged:  # the replay recomputes the same values (resume is exact): keep the first
            return
        try:
            runs.log_epoch(self.uri, self.run_id, m, epoch)
            self.logged.add(epoch)
        except Exception as exc:  # a tracking hiccup must never kill the training run
            logging.getLogger(__name__).warning("MLflow logging failed at epoch %s: %s", m.get("epoch"), exc)


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    rt = cfg.runtime
    use_gpu = rt.use_gpu if rt.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": worker_cpus(rt.cpus_per_worker, use_gpu, rt.num_workers, ray.cluster_resources().get("CPU", 1))}
    if use_gpu:
        resources["GPU"] = rt.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=rt.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def worker_cpus(asked: float | None, use_gpu: bool, num_workers: int, cluster_cpus: float) -> float:
    """CPUs per Train worker: as asked, else 1 beside a GPU, else an equal share of the cluster's CPUs (a CPU
    worker trains with as many threads as it holds CPUs)."""
    if asked is not None:
        return asked
    return 1.0 if use_gpu else float(max(1, int(cluster_cpus // num_workers)))


def build_trainer(cfg: TrainConfig, callbacks: list | None = None) -> TorchTrainer:
    storage = cfg.runtime.storage_path or "mbib_runs"
    storage = storage if "://" in storage else str(Path(storage).resolve())  # keep s3:// and gs:// URIs as given
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=storage,
        failure_config=ray.train.FailureConfig(max_failures=cfg.runtime.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SELECT_METRIC,
                                                     checkpoint_score_order="max"),
        callbacks=callbacks or [],
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=cfg.to_dict(),
                        scaling_config=scaling_config(cfg), run_config=run_config)


def root_cause(exc: BaseException) -> BaseException:
    """Dig the error out of Ray's wrappers so the user sees it in one line: an mbib error, else the first error
    raised outside Ray (a worker's own exception), else `exc`."""
    seen, stack, own = set(), [exc], None
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MBIBError):
            return e
        if own is None and not type(e).__module__.startswith("ray"):
            own = e
        for attr in ("worker_failures", "errors"):
            nested = getattr(e, attr, None)
            if isinstance(nested, dict):
                stack.extend(v for v in nested.values() if isinstance(v, BaseException))
        for nxt in (e.__cause__, e.__context__, getattr(e, "cause", None)):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return own or exc


class CopyLatestCheckpoint(ray.train.UserCallback):
    """Runs in the Train controller: keeps an atomic copy of the latest checkpoint.pt at `target` (a file that
    can be committed or moved, so another machine continues the run with runtime.resume_from)."""

    def __init__(self, target: str | Path):
        self.target = Path(target)

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            atomic_write(self.target, lambda fh: fh.write((Path(d) / CHECKPOINT_FILE).read_bytes()))


def run_training(cfg: TrainConfig, *, track: bool = True, tracking_uri: str | None = None,
                 parent_run_id: str | None = None, callbacks: list | None = None) -> TrainOutcome:
    """Train on Ray Train; record params, per-epoch metrics and artifacts in MLflow; return the outcome.

    `callbacks`: further Ray Train UserCallbacks (e.g. CopyLatestCheckpoint)."""
    cfg.data.data_root = pinned_data_root(cfg.data.data_root)  # workers run in another working directory
    cfg.data.dataset = pinned_dataset(cfg.data.dataset)
    if cfg.runtime.resume_from:
        resume = Path(cfg.runtime.resume_from).expanduser().resolve()
        if not resume.is_file():
            raise ConfigError(f"runtime.resume_from={cfg.runtime.resume_from} is not a file: pass a checkpoint.pt")
        cfg.runtime.resume_from = str(resume)
    data = load_data(cfg)  # fail fast on the driver with a one-line error, before any worker starts
    cfg.run_name = cfg.run_name or f"{cfg.loss.method}-{Path(cfg.data.dataset).stem}-{uuid.uuid4().hex[:6]}"
    ensure_ray()
    client = run_id = uri = None
    if track:
        uri = tracking.tracking_uri(tracking_uri)
        client, run_id = runs.start_training_run(uri, cfg, len(data.classes), sum(data.class_counts), parent_run_id)
    callbacks = [*([MLflowReportCallback(uri, run_id)] if track else []), *(callbacks or [])]
    try:
        result = build_trainer(cfg, callbacks).fit()
    except Exception as exc:  # Ray wraps worker errors; surface ours as one line
        if client is not None:
            client.set_terminated(run_id, "FAILED")
        cause = root_cause(exc)
        if isinstance(cause, MBIBError):
            raise cause from None
        detail = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        raise TrainingError(f"training failed: {type(cause).__name__}: {detail[:300]}; to resume from its last "
                            f"checkpoint, rerun with --run-name {cfg.run_name} (same --storage-path), or let it "
                            "restart itself with --max-failures N") from exc
    metrics = dict(result.metrics or {})
    best_ckpt, best_metrics = None, {}
    if result.best_checkpoints:
        ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(SELECT_METRIC, -1))
        best_ckpt = Path(ckpt.path) / CHECKPOINT_FILE
    outcome = TrainOutcome(metrics, best_metrics, best_ckpt, Path(result.path), run_id, uri)
    if client is not None:
        runs.log_final_artifacts(client, run_id, best_ckpt, best_metrics)
        client.set_terminated(run_id, "FINISHED")
    return outcome

