"""Summaries people read at the end of a run, and `mbib evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mbib.checkpoint import check_compatible, describe, load_checkpoint, load_weights
from mbib.console import fmt
from mbib.config import TrainConfig
from mbib.data.split import HELDOUT, SELECT_METRIC
from mbib.tracking import ui_command
from mbib.train.engine import Engine, load_data


def _table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        t.add_row(k, fmt(v, 2) if isinstance(v, float) else str(v))  # "n/a" for an empty shot group
    return t


def print_summary(cfg: TrainConfig, outcome) -> None:
    m = outcome.best_metrics or outcome.metrics
    rows = {k: m[k] for k in ("acc", "many", "medium", "few") if k in m}
    rows.update({k: v for k, v in m.items() if k.startswith("acc_")})
    rows.update({k: m[k] for k in (SELECT_METRIC, *HELDOUT) if k in m and "heldout_acc" in m})  # a held-out split
    selected = "selection split" if "heldout_acc" in m else "test set"
    rows[f"best epoch (by {selected})"] = int(m.get("epoch", -1)) + 1
    rows["best checkpoint"] = str(outcome.best_checkpoint)
    if outcome.mlflow_run_id:
        rows["mlflow run"] = outcome.mlflow_run_id
    imbalance = "as stored" if cfg.data.imbalance_factor is None else f"IF {cfg.data.imbalance_factor:g}"
    Console().print(_table(f"{cfg.loss.method} on {cfg.data.dataset} ({imbalance}), {cfg.optim.epochs} epochs", rows))
    if outcome.mlflow_run_id:  # on its own line, whole, to copy
        print(f"open MLflow with: {ui_command(outcome.tracking_uri)}")


def evaluate_checkpoint(path: str | Path, data_root: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Rebuild the run's model and data from the checkpoint and evaluate on the balanced test set."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = load_checkpoint(path, map_location=dev)
    cfg = TrainConfig.from_dict(state["config"])
    if data_root is not None:
        cfg.data.data_root = data_root
    engine = Engine(cfg, load_data(cfg), dev)
    check_compatible(state, engine.spec, cfg.data.dataset, path, cfg.data.recompress)  # e.g. the data root now holds other classes
    load_weights(engine.task.network, state["model"], state, describe(engine.spec, cfg.data.dataset), path)
    result = engine.evaluate()
    return {"checkpoint": str(path), "dataset": cfg.data.dataset, "method": cfg.loss.method,
            "epoch": int(state.get("epoch", -1)) + 1, **result.metrics()}


def print_eval(metrics: dict[str, Any]) -> None:
    Console().print(_table(f"{metrics['method']} on {metrics['dataset']}", metrics))
