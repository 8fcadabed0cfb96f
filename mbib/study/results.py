"""A study's results: one row per trial, the best trial and Optuna's parameter importances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mbib.study.spec import BUDGET, METRIC, SEARCH_SPACE


@dataclass
class TrialRow:
    """One trial as the study sees it: its params, its best evaluation and how much budget it used."""

    trial_id: str
    number: int
    params: dict[str, float]
    acc: float
    epochs_done: int
    state: str  # "COMPLETE" (full budget), "PRUNED" (stopped by ASHA), "FAIL"
    checkpoint_path: str | None
    metrics: dict[str, float]
    intermediate: dict[int, float]  # epochs_done -> acc, what ASHA compared
    worker_nodes: str = ""


@dataclass
class DatasetOutcome:
    key: str
    experiment_path: str
    parent_run_id: str
    rows: list[TrialRow]
    best: TrialRow | None
    importances: dict[str, float]
    model_name: str | None
    model_version: str | None


def collect_rows(result_grid, max_epochs: int) -> list[TrialRow]:
    rows = []
    for res in result_grid:
        df, last = res.metrics_dataframe, res.metrics or {}
        tid = last.get("trial_id") or Path(res.path).name
        params = {k: float(res.config[k]) for k in SEARCH_SPACE}
        evals = df[df[METRIC].notna()] if df is not None and METRIC in df else None
        if evals is None or evals.empty:
            rows.append(TrialRow(tid, trial_number(tid, res.path), params, float("nan"), 0, "FAIL", None, {}, {}))
            continue
        best = evals.loc[evals[METRIC].idxmax()]
        done = int(df[BUDGET].max())
        state = "FAIL" if res.error else ("COMPLETE" if done >= max_epochs else "PRUNED")
        metrics = {k: float(best[k]) for k in ("acc", "many", "medium", "few") if k in best and finite(best[k])}
        nodes = ",".join(sorted({n for v in df.get("worker_nodes", []) if isinstance(v, str) for n in v.split(",") if n}))
        rows.append(TrialRow(tid, trial_number(tid, res.path), params, float(best[METRIC]), done, state,
                             best.get("checkpoint_path") if isinstance(best.get("checkpoint_path"), str) else None,
                             metrics, {int(e): float(a) for e, a in zip(evals[BUDGET], evals[METRIC])}, nodes))
    return sorted(rows, key=lambda r: r.number)


def trial_number(trial_id: str, trial_dir: str) -> int:
    """Tune names trial folders <trainable>_<trial id>_<number>_<params>: the number orders the trials."""
    head = Path(trial_dir).name.split(f"{trial_id}_", 1)[-1].split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """Best full-budget trial; only if none ran the full budget, the best of the stopped ones."""
    full = [r for r in rows if r.state == "COMPLETE"]
    pool = full or [r for r in rows if r.state == "PRUNED"]
    return max(pool, key=lambda r: r.acc) if pool else None


def optuna_study(rows: list[TrialRow]):
    """An Optuna study rebuilt from the trial results (OptunaSearch's own study lives inside the searcher)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    dists = {k: optuna.distributions.FloatDistribution(lo, hi) for k, (lo, hi) in SEARCH_SPACE.items()}
    for r in rows:
        if r.state == "FAIL":
            continue
        state = optuna.trial.TrialState.COMPLETE if r.state == "COMPLETE" else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(params=r.params, distributions=dists, state=state,
                                                  value=r.acc if r.state == "COMPLETE" else None,
                                                  intermediate_values=r.intermediate))
    return study


def param_importances(rows: list[TrialRow]) -> tuple[dict[str, float], str]:
    """Optuna's importances over the full-budget trials; with fewer than two, over every trial's best score."""
    import optuna

    study = optuna_study(rows)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    basis = "complete trials"
    if len(complete) < 2:  # too few full-budget trials: fall back to all trials, labelled as such
        basis = "all trials, stopped ones at their truncated score"
        study = optuna_study([TrialRow(**{**r.__dict__, "state": "COMPLETE"}) for r in rows if r.state != "FAIL"])
    try:
        return dict(optuna.importance.get_param_importances(study)), basis
    except (RuntimeError, ValueError) as exc:  # e.g. fewer than two trials, or all scores equal
        return {}, f"not computed: {exc}"

