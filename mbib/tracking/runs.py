"""The MLflow record of single runs: a training run (params, data set, final artifacts), the reproduction's parent
run and report, an ONNX export with its parity report."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mbib import plots, tracking
from mbib.checkpoint import CHECKPOINT_FILE, load_checkpoint
from mbib.storelock import LockPatientClient
from mbib.train.build import loss_settings


def start_training_run(uri: str, cfg, num_classes: int, train_images: int, parent_run_id: str | None = None):
    """A run for `cfg` (nested under parent_run_id when given) with its config as params; returns (client, run id)."""
    tracking.check_reachable(uri)
    client = LockPatientClient(tracking.store_client(uri))  # a second writer on a SQLite store: wait, not die
    exp_id = tracking.get_or_create_experiment(client, cfg.experiment)
    tags = {"mlflow.runName": cfg.run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    loss = {f"loss.{k}": v for k, v in loss_settings(cfg).items()}  # what the criterion got, defaults resolved
    tracking.log_params(client, run_id, {**cfg.flat(), **loss, "num_classes": num_classes, "train_images": train_images})
    tracking.log_dataset(client, run_id, Path(cfg.data.dataset).stem, cfg.data)
    return client, run_id


def log_epoch(uri: str, run_id: str, metrics: dict[str, Any], epoch: int) -> None:
    """One report as one MLflow step (called from the Train controller, the one writer)."""
    tracking.log_metrics(LockPatientClient(tracking.store_client(uri)), run_id, metrics, step=epoch)


def log_final_artifacts(client, run_id: str, best_checkpoint: Path | None, best_metrics: dict[str, Any]) -> None:
    """Best checkpoint, per-class accuracy vs class size (PNG) and confusion statistics (JSON)."""
    if best_checkpoint is None:
        return
    state = load_checkpoint(best_checkpoint)
    ds = state["data_spec"]
    summary = tracking.confusion_summary(state["confusion"], ds["classes"], ds["class_counts"])
    final = {f"final_{k}": v for k, v in best_metrics.items() if k in ("acc", "many", "medium", "few")}
    tracking.log_metrics(client, run_id, final, step=int(best_metrics.get("epoch", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(best_checkpoint, Path(tmp) / CHECKPOINT_FILE)
        client.log_artifact(run_id, str(Path(tmp) / CHECKPOINT_FILE), artifact_path="best_checkpoint")
        png = plots.per_class_plot([c["accuracy"] for c in summary["per_class"]], ds["class_counts"],
                                   Path(tmp) / "per_class_accuracy.png")
        client.log_artifact(run_id, str(png), artifact_path="plots")
        client.log_artifact(run_id, str(tracking.write_json(summary, Path(tmp) / "confusion.json")))


def report_parent_run(uri: str, experiment: str, name: str, params: dict[str, Any], known: dict[str, Any]) -> str:
    """One parent run per reproduction report: `known` ({tracking_uri, parent_run_id} from the state file) is
    reused when it is in the same store and still there."""
    client = tracking.store_client(uri)
    if known.get("tracking_uri") == uri:
        try:
            return client.get_run(known["parent_run_id"]).info.run_id
        except Exception:  # the store was wiped since: start a new parent
            pass
    exp_id = tracking.get_or_create_experiment(client, experiment)
    run_id = client.create_run(exp_id, tags={"mlflow.runName": name}).info.run_id
    tracking.log_params(client, run_id, params)
    return run_id


def log_report(uri: str, parent_run_id: str, files: list[Path]) -> None:
    """The reproduction report and its PNGs as artifacts of the parent run, which then ends."""
    client = tracking.store_client(uri)
    for f in files:
        client.log_artifact(parent_run_id, str(f), artifact_path="report")
    client.set_terminated(parent_run_id, "FINISHED")


def log_export(onnx_path: Path, report: dict[str, Any], tracking_uri: str | None = None,
               experiment: str | None = None) -> str | None:
    """Log the ONNX file and its parity report to the active MLflow run, or to a new run at tracking_uri."""
    import mlflow

    if mlflow.active_run() is None and not tracking_uri:
        return None
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if mlflow.active_run() is not None:
        run_context = contextlib.nullcontext(mlflow.active_run())
    else:
        if experiment:
            mlflow.set_experiment(experiment)
        run_context = mlflow.start_run(run_name=f"export-{onnx_path.stem}")
    with run_context as run:
        mlflow.log_artifact(str(onnx_path), artifact_path="onnx")
        mlflow.log_dict(report, "onnx/parity_report.json")
        mlflow.log_metric("onnx_max_abs_diff_logits", report["max_abs_diff_logits"])
        return run.info.run_id
