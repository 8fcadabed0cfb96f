"""Training the reproduction's cells (Ray Train or this process) and analysing each final model."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any, Callable

from mbib.analysis import checkpoint_analysis
from mbib.config import TrainConfig
from mbib.reproduction.grid import EXPERIMENT, Cell, Plan, base_config, carry_path, cell_config, plan_cells
from mbib.reproduction.report import fmt_shots, shots_of
from mbib.reproduction.state import State, cell_claim, git_commit


def train_cell(plan: Plan, base: TrainConfig, cell: Cell, tracking_uri: str | None,
               parent_run_id: str | None, carry: Path) -> dict[str, Any]:
    """Train one cell on Ray Train (an MLflow child run) or, with plan.runner "plain", in this process."""
    cfg = cell_config(plan, base, cell)
    start = time.perf_counter()
    if plan.runner == "plain":
        from mbib.train.plain import run_plain

        out = run_plain(cfg, carry, log=lambda line: print(f"  {cell.key}: {line}", flush=True))
        final, best, extra = out.metrics, out.best_metrics, {"runner": "plain"}
    else:
        from mbib.train.runner import CopyLatestCheckpoint, run_training

        if carry.is_file():
            print(f"  continuing from {carry}", flush=True)
            cfg.runtime.resume_from = str(carry)
        ray_out = run_training(cfg, track=tracking_uri is not None, tracking_uri=tracking_uri,
                               parent_run_id=parent_run_id, callbacks=[CopyLatestCheckpoint(carry)])
        final, best = ray_out.metrics, ray_out.best_metrics or ray_out.metrics
        extra = {"runner": "ray", "mlflow_run_id": ray_out.mlflow_run_id, "run_name": cfg.run_name}
    kept = carried(carry)  # the latest checkpoint, read once
    if plan.runner != "plain":  # Ray's own best checkpoints cover only the leg that just ran
        best = kept.get("best_metrics") or best
    return {"method": cell.method, "imbalance_factor": cell.imbalance_factor, "overrides": dict(cell.overrides),
            "final": shots_of(final), "best": shots_of(best), "best_epoch": int(best.get("epoch", -1)) + 1,
            "epochs": cfg.optim.epochs, "seed": cfg.runtime.seed, "commit": git_commit(),
            # training time over every machine the cell ran on (carried in its checkpoints), else this leg's
            "wall_s": final.get("elapsed_s", time.perf_counter() - start), "final_checkpoint": str(carry),
            "final_heads": {k: v for k, v in final.items() if k.startswith("acc_")},
            "legs": kept.get("legs") or [],  # which epochs trained where, in which precision
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), **extra}


def carried(carry: Path) -> dict[str, Any]:
    """The cell's latest checkpoint, which carries over every leg (fit's Progress) its best evaluation (Ray's own
    best checkpoints cover only the leg that just ran, so a continued cell would lose an earlier leg's best) and
    its legs; empty before it has one."""
    from mbib.checkpoint import load_checkpoint

    return load_checkpoint(carry) if carry.is_file() else {}


def parent_run(state: State, plan: Plan, tracking_uri: str) -> str:
    """One MLflow parent run per report, reused when the grid resumes against the same store."""
    from mbib.tracking.runs import report_parent_run

    params = {"dataset": plan.dataset, "epochs": plan.epochs, "seed": plan.seed,
              **{f"set.{k}": v for k, v in plan.overrides.items()}}
    run_id = report_parent_run(tracking_uri, EXPERIMENT, plan.tag, params, state.data.get("mlflow", {}))
    if state.data.get("mlflow") != {"tracking_uri": tracking_uri, "parent_run_id": run_id}:
        state.data["mlflow"] = {"tracking_uri": tracking_uri, "parent_run_id": run_id}
        state.save()
    return run_id


def run_cells(plan: Plan, state: State, cells: list[Cell], tracking_uri: str | None,
              after_cell: Callable[[], None] = lambda: None, on_claim: Callable[[], None] = lambda: None) -> None:
    """Train the cells not in the state yet, saving the state (and calling `after_cell`: the report) after each;
    `on_claim` runs when this process has claimed a cell, before training it (the --jobs test's barrier)."""
    base = base_config(plan)
    parent = parent_run(state, plan, tracking_uri) if tracking_uri else None
    for i, cell in enumerate(cells, 1):
        head = f"[{i}/{len(cells)}] {cell.key}"
        carry = carry_path(state.path.parent, plan, cell)
        with cell_claim(carry) as mine:
            state.refresh()  # under the claim: a cell another process finished is in the file by now
            if cell.key in state.cells:
                print(f"{head}: finished earlier, skipped ({fmt_shots(state.cells[cell.key]['final'])})", flush=True)
                continue
            if not mine:
                print(f"{head}: another process is training it, skipped", flush=True)
                continue
            on_claim()
            print(f"{head}: training {cell.method} at IF {cell.imbalance_factor:g}, {plan.epochs} epochs "
                  f"(process {os.getpid()}) ...", flush=True)
            record = train_cell(plan, base, cell, tracking_uri, parent, carry)
            state.cells[cell.key] = record
            state.save()
            record["analysis"] = checkpoint_analysis(carry, cell_config(plan, base, cell))  # the final model, at hand
            state.save()
        after_cell()  # a grid spread over days: each finished cell's report can be committed at once
        print(f"{head}: done in {record['wall_s']:.0f} s: {fmt_shots(record['final'])}", flush=True)


def run_analyses(plan: Plan, state: State) -> None:
    """Analyse every finished cell that lacks its analysis and whose final checkpoint is at hand."""
    base = base_config(plan)
    for cell in plan_cells(plan):
        record = state.cells.get(cell.key)
        if record is None or "analysis" in record:
            continue
        final = carry_path(state.path.parent, plan, cell)
        if not final.is_file():
            print(f"analysis of {cell.key}: its final checkpoint {final} is gone; retrain the cell by deleting it "
                  f"from {state.path}", flush=True)
            continue
        print(f"analysis of {cell.key} on the test set ...", flush=True)
        record["analysis"] = checkpoint_analysis(final, cell_config(plan, base, cell))
        state.save()


def log_report(state: State, report: Path, uri: str) -> None:
    """The report and its PNGs as artifacts of the parent run."""
    from mbib.tracking.runs import log_report as log_files

    parent = state.data.get("mlflow", {}).get("parent_run_id")
    if parent:
        log_files(uri, parent, [report, *report.parent.glob(f"{report.stem}-*.png")])
