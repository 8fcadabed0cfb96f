"""A study's results: one row per trial, the best trial and Optuna's parameter importances."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from mbib.data.split import HELDOUT
from mbib.study.spec import BUDGET, METRIC, SEARCH_SPACE

REPORTED = ("acc", "many", "medium", "few", *HELDOUT)  # a chosen epoch's numbers kept for the report


@dataclass
class TrialRow:
    """One trial as the study sees it: its params, its chosen epoch (best on the selection split) and the budget used."""

    trial_id: str
    number: int
    params: dict[str, float]
    score: float  # the chosen epoch's selection-split accuracy: what ranks trials (NaN: never evaluated)
    epochs_done: int
    state: str  # "COMPLETE" (full budget), "PRUNED" (stopped by ASHA), "FAIL"
    checkpoint_path: str | None  # the chosen epoch's checkpoint
    metrics: dict[str, float]  # the chosen epoch's report: acc/many/medium/few (whole test set), heldout_*, epoch
    intermediate: dict[int, float]  # epochs_done -> selection score, what ASHA compared
    worker_nodes: str = ""

    @property
    def epoch(self) -> int:
        """The chosen epoch, counted from 1 (0: none)."""
        return int(self.metrics.get(BUDGET, 0))


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
    selection: tuple[str, str] = ("the whole test set", "the whole test set")  # (what selected, what reports)


def collect_rows(result_grid, max_epochs: int) -> list[TrialRow]:
    """One row per Tune result (anything with metrics_dataframe, metrics, config, path and error), by number."""
    return sorted((trial_row(res, max_epochs) for res in result_grid), key=lambda r: r.number)


def trial_row(res, max_epochs: int) -> TrialRow:
    """A trial's row: its chosen epoch is the evaluation with the highest finite selection score (the latest on
    ties), whichever epoch that is; a trial that raised is FAIL, one stopped short of max_epochs PRUNED."""
    df, last = res.metrics_dataframe, res.metrics or {}
    tid = last.get("trial_id") or Path(res.path).name
    params = {k: float(res.config[k]) for k in SEARCH_SPACE}
    has = df is not None and not df.empty
    done = int(df[BUDGET].max()) if has and BUDGET in df and df[BUDGET].notna().any() else 0
    state = "FAIL" if res.error or not has else ("COMPLETE" if done >= max_epochs else "PRUNED")
    evals = df[df[METRIC].map(finite)] if has and METRIC in df else None
    nodes = ",".join(sorted({n for v in (df.get("worker_nodes", []) if has else []) if isinstance(v, str)
                             for n in v.split(",") if n}))
    if evals is None or evals.empty:
        return TrialRow(tid, trial_number(tid, res.path), params, float("nan"), done, state, None, {}, {}, nodes)
    best = evals.loc[evals[METRIC].astype(float)[::-1].idxmax()]  # the latest on ties, the one Ray's num_to_keep keeps
    metrics = {k: float(best[k]) for k in (*REPORTED, METRIC, BUDGET) if k in best and finite(best[k])}
    checkpoint = best.get("checkpoint_path")
    return TrialRow(tid, trial_number(tid, res.path), params, float(best[METRIC]), done, state,
                    checkpoint if isinstance(checkpoint, str) else None, metrics,
                    {int(e): float(a) for e, a in zip(evals[BUDGET], evals[METRIC])}, nodes)


def rows_so_far(trials, max_epochs: int) -> list[TrialRow]:
    """Rows of the given Tune trials (the ones that ended) while the study runs, read from each trial's folder as
    Tune reads results at the end (its result.json, flushed row by row)."""
    from ray.tune import Result

    paths = [next((d for d in (t.local_path, t.path) if d and Path(d, "result.json").is_file()), None) for t in trials]
    return collect_rows([Result.from_path(p) for p in paths if p], max_epochs)


def checkpoint_here(path: str | None, root: str) -> str | None:
    """A checkpoint path recorded before the study moved (another folder or machine), as it is now: the same
    run and epoch under `root`/train_runs, where a moved study's Train runs live."""
    if not path or "://" in path or Path(path).exists() or "train_runs" not in Path(path).parts:
        return path
    parts = Path(path).parts
    here = Path(root, *parts[len(parts) - 1 - parts[::-1].index("train_runs"):])
    return str(here) if here.parent.is_dir() else path


def unfinished(statuses: list[str], num_samples: int) -> int:
    """How many of the study's trials are left unended (running, pending, paused or never created), from the
    statuses Tune saved when its loop stopped (it marks stopped trials TERMINATED only after saving)."""
    return max(num_samples - len(statuses), 0) + sum(s not in ("TERMINATED", "ERROR") for s in statuses)


def trial_number(trial_id: str, trial_dir: str) -> int:
    """Tune names trial folders <trainable>_<trial id>_<number>_<params>: the number orders the trials."""
    head = Path(trial_dir).name.split(f"{trial_id}_", 1)[-1].split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # numpy's too


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest selection score among the full-budget ones; only if none ran the full budget,
    among the stopped ones; on equal scores the earlier trial. Failed and never-evaluated trials never win."""
    scored = [r for r in rows if finite(r.score)]
    pool = [r for r in scored if r.state == "COMPLETE"] or [r for r in scored if r.state == "PRUNED"]
    return max(pool, key=lambda r: (r.score, -r.number)) if pool else None  # ties: the earlier, whatever the order


def optuna_study(rows: list[TrialRow]):
    """An Optuna study rebuilt from the trial results (OptunaSearch's own study lives inside the searcher)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    dists = {k: optuna.distributions.FloatDistribution(lo, hi) for k, (lo, hi) in SEARCH_SPACE.items()}
    for r in rows:
        if r.state == "FAIL" or not finite(r.score):
            continue
        state = optuna.trial.TrialState.COMPLETE if r.state == "COMPLETE" else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(params=r.params, distributions=dists, state=state,
                                                  value=r.score if r.state == "COMPLETE" else None,
                                                  intermediate_values=r.intermediate))
    return study


def param_importances(rows: list[TrialRow]) -> tuple[dict[str, float], str]:
    """Optuna's importances of the selection score over the full-budget trials; with fewer than two, over every
    trial's chosen-epoch score."""
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

