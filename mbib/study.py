"""Hyperparameter studies: Ray Tune trials that each fit a Ray Train run, searched by Optuna, logged to MLflow.

One study = one MLflow experiment; per data set one Tune experiment, one parent MLflow run and one nested child
run per trial. Only the driver writes to MLflow (SQLite allows one writer). ASHA stops weak trials early; the
searcher tells Optuna those trials are PRUNED so TPE never mistakes a truncated accuracy for a final one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from mbib import console, tracking
from mbib.checkpoint import CHECKPOINT_FILE, load_checkpoint
from mbib.config import TrainConfig, apply_overrides, parse_sets, resolve_config
from mbib.errors import ConfigError, MBIBError, TrainingError
from mbib.raylocal import ensure_ray
from mbib.storelock import LockPatientClient

SEARCH_SPACE: dict[str, tuple[float, float]] = {  # the paper's ranges (Sec. 4.2, Fig. 3-4)
    "beta": (0.0, 5.0), "a": (0.0, 1.0), "b": (0.0, 1.0), "m": (0.0, 0.5), "gamma": (0.0, 1.0)}
METRIC, BUDGET = "acc", "epochs_done"
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial function
TAG_STUDY, TAG_DATASET, TAG_TRIAL = "mbib.study", "mbib.dataset", "mbib.trial_id"
TAG_LATE = "mbib.logged_on_resume"  # on runs whose records were logged by --resume after the server was away
_LOST: dict[str, str] = {}  # parent run id -> why the tracking server stopped answering during this driver


@dataclass
class DatasetSpec:
    key: str  # names the Tune experiment, the parent run and the registered model ("cifar100-lt-if100")
    overrides: dict[str, Any]  # dotted config keys on top of the study's preset


@dataclass
class StudySpec:
    name: str
    preset: str
    datasets: list[DatasetSpec]
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every data set
    epochs: int | None = None  # scales the preset's schedule (warm-up, milestones, DRW epoch) to this many epochs
    reshape: dict[str, Any] = field(default_factory=dict)  # redefines the preset's schedule before scaling (smoke)
    num_samples: int = 24
    max_concurrent: int = 8
    gpus_per_trial: float = 0.0  # 0.25 packs four CIFAR trials on one GPU
    grace_period: int | None = None  # ASHA's first rung in epochs; None -> epochs // 10
    reduction_factor: int = 3
    seed: int = 0
    storage_path: str | None = None  # Tune + Train results; s3://... on a cluster
    tracking_uri: str | None = None

    def base_config(self, ds: DatasetSpec) -> TrainConfig:
        cfg = resolve_config(self.preset, {**self.overrides, **ds.overrides}, epochs=self.epochs, reshape=self.reshape,
                             pin_data_root=True)  # trials run in other working directories
        if self.gpus_per_trial > 0:  # a fraction of a GPU per Train worker lets small trials share one GPU
            cfg = apply_overrides(cfg, {"runtime.use_gpu": True,
                                        "runtime.gpus_per_worker": self.gpus_per_trial / cfg.runtime.num_workers})
        return cfg

    def root(self) -> str:
        base = self.storage_path or "mbib_runs"
        return f"{base.rstrip('/')}/{self.name}" if "://" in base else str(Path(base).resolve() / self.name)


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


def paper_point(cfg: TrainConfig) -> dict[str, float]:
    """The preset's (paper's) loss settings: beta=5, a=0.1, b=0.3, m=0.1, gamma=0 (CIFAR) / 0.5 (ImageNet, iNat)."""
    return {k: float(getattr(cfg.loss, k)) for k in SEARCH_SPACE}


def trial_train_config(config: dict[str, Any]) -> TrainConfig:
    """The Train config of one trial: the data set's base config with the searched loss settings."""
    cfg = TrainConfig.from_dict(config["train"])
    return apply_overrides(cfg, {f"loss.{k}": config[k] for k in SEARCH_SPACE})


# ---------------------------------------------------------------- trial side (runs in Ray actors)

class WorkerNodes(WorkerGroupCallback):
    """Runs in the Train controller: remembers which nodes the worker group landed on (placement checks)."""

    def __init__(self):
        self.node_ids: list[str] = []

    def after_worker_group_start(self, worker_group):
        self.node_ids = sorted({w.metadata.node_id for w in worker_group.get_workers()})


class StudyReportCallback(TuneReportCallback):
    """TuneReportCallback that also reports the epochs done (ASHA's clock) and the workers' node ids."""

    def __init__(self, nodes: WorkerNodes):
        super().__init__()
        self.nodes = nodes

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0], **{BUDGET: int(metrics[0]["epoch"]) + 1, "worker_nodes": ",".join(self.nodes.node_ids)})
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: fits one TorchTrainer (Train V2 pattern); its reports reach Tune via the callback."""
    from mbib.train.runner import build_trainer

    cfg = trial_train_config(config)
    cfg.run_name = tune.get_context().get_trial_id()  # a restored trial finds its Train run and resumes it
    nodes = WorkerNodes()
    build_trainer(cfg, [StudyReportCallback(nodes), nodes]).fit()


# ---------------------------------------------------------------- search

class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped before the full budget is PRUNED, not COMPLETE.

    Plain OptunaSearch tells a stopped trial COMPLETE with its truncated accuracy, so TPE would learn from
    short-budget scores as if they were final. Optuna's TPE ranks pruned trials below every complete one (by
    the step they reached, then their last intermediate value), which is what an early stop means.
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        self.max_epochs = max_epochs
        super().__init__(*args, **kwargs)

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:  # only evaluation epochs carry the accuracy
            super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: int(result[BUDGET])})

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        stopped_early = bool(result) and not error and int(result.get(BUDGET, 0)) < self.max_epochs
        if not stopped_early or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        from optuna.trial import TrialState

        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def make_searcher(first_point: dict[str, float], max_epochs: int, seed: int) -> PruningOptunaSearch:
    from optuna.distributions import FloatDistribution

    space = {k: FloatDistribution(lo, hi) for k, (lo, hi) in SEARCH_SPACE.items()}
    return PruningOptunaSearch(space=space, metric=METRIC, mode="max", points_to_evaluate=[first_point],
                               seed=seed, max_epochs=max_epochs)


def make_scheduler(spec: StudySpec, max_epochs: int) -> tune.schedulers.ASHAScheduler:
    grace = spec.grace_period or max(1, max_epochs // 10)
    return tune.schedulers.ASHAScheduler(time_attr=BUDGET, metric=METRIC, mode="max", max_t=max_epochs, grace_period=min(grace, max_epochs),
                                         reduction_factor=spec.reduction_factor,
                                         stop_last_trials=False)  # full-budget trials end on their own, cleanly


# ---------------------------------------------------------------- MLflow, driver side only

class MLflowTrialLogger(tune.Callback):
    """Each trial a child run nested under the data set's parent run; written by the Tune driver only.

    Child runs are found again by their trial-id tag, so a resumed study reuses them (no duplicates) and skips
    epochs already logged.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, dataset_key: str, max_epochs: int):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.dataset_key, self.max_epochs = dataset_key, max_epochs
        self._reset()

    def _reset(self) -> None:
        self._client, self._runs, self._logged = None, {}, {}

    def _guarded(self, fn, *args) -> None:
        """A tracking server that goes away must not stop the trials: note why, stop logging; --resume fills in."""
        if self.parent_run_id in _LOST:
            return
        try:
            fn(*args)
        except Exception as exc:  # MLflow raises several types for a dead server
            _LOST[self.parent_run_id] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            logging.getLogger(__name__).warning("MLflow stopped answering (%s); trials go on, their records are "
                                                "logged by --resume", _LOST[self.parent_run_id])

    def __getstate__(self):  # Tune pickles callbacks into the experiment state; clients and caches stay behind
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _logged={})
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = LockPatientClient(MlflowClient(self.uri))
        return self._client

    def child_run(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = find_child_runs(self.client, self.experiment_id, self.parent_run_id, tid)
        if found:
            run = found[0]
            self._logged[tid] = int(run.data.metrics.get(BUDGET, 0))
        else:
            number = str(getattr(trial, "experiment_tag", "")).split("_")[0] or tid  # Tune's tag starts with the index
            run = self.client.create_run(self.experiment_id, tags={  # names start with what tells runs apart
                "mlflow.parentRunId": self.parent_run_id, "mlflow.runName": f"#{number} {self.dataset_key}",
                TAG_TRIAL: tid, TAG_DATASET: self.dataset_key})
            cfg = trial_train_config(trial.config)
            tracking.log_params(self.client, run.info.run_id,
                                {**{k: trial.config[k] for k in SEARCH_SPACE}, **cfg.flat()})
            tracking.log_dataset(self.client, run.info.run_id, self.dataset_key, cfg.data)
            self._logged[tid] = 0
        self._runs[tid] = run.info.run_id
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guarded(self.child_run, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guarded(self.log_result, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guarded(self.complete, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guarded(lambda: self.client.set_terminated(self.child_run(trial), "FAILED"))

    def log_result(self, trial, result: dict) -> bool:
        run_id, step = self.child_run(trial), int(result.get(BUDGET, 0))
        if step <= self._logged.get(trial.trial_id, 0):
            return False  # logged before the driver was interrupted
        tracking.log_metrics(self.client, run_id, {k: v for k, v in result.items() if k not in _TUNE_KEYS}, step=step)
        self._logged[trial.trial_id] = step
        return True

    def complete(self, trial) -> bool:
        run_id = self.child_run(trial)
        run = self.client.get_run(run_id)
        if run.info.status == "FINISHED":
            return False  # finished before an interruption that came before Tune saved its state: keep the record
        done = int((trial.last_result or {}).get(BUDGET, 0))
        self.client.set_tag(run_id, "mbib.stopped_early", str(done < self.max_epochs).lower())
        accs = [m.value for m in self.client.get_metric_history(run_id, METRIC)]
        if accs:  # the run list shows names without configuring columns: the score goes there too
            self.client.set_tag(run_id, "mlflow.runName", f"{run.info.run_name} acc {max(accs):.1f}")
        self.client.set_terminated(run_id, "FINISHED")
        return True

    def backfill(self, result_grid) -> int:
        """Log from Tune's results what MLflow missed while its server was away; mark each run it completes."""
        filled = 0
        for res in result_grid:
            df = res.metrics_dataframe
            if df is None or df.empty or "trial_id" not in df:
                continue
            tid = str(df["trial_id"].iloc[-1])
            trial = SimpleNamespace(trial_id=tid, config=res.config, last_result=res.metrics,
                                    experiment_tag=str(_trial_number(tid, res.path)))
            rows = [{k: v.item() if hasattr(v, "item") else v for k, v in r.items() if not str(k).startswith("config/")}
                    for r in df.to_dict("records")]
            late = sum(self.log_result(trial, {k: v for k, v in r.items() if _finite(v)}) for r in rows)
            late += 0 if res.error else self.complete(trial)
            if late:
                self.client.set_tag(self.child_run(trial), TAG_LATE, f"{late} records logged by --resume "
                                    "(the tracking server was away when the trial ran)")
            filled += late
        return filled


_TUNE_KEYS = {"trial_id", "date", "timestamp", "pid", "hostname", "node_ip", "time_this_iter_s",
              "time_since_restore", "iterations_since_restore", "done", "epoch", "param_checksum"}


def find_child_runs(client, experiment_id: str, parent_run_id: str, trial_id: str | None = None) -> list:
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    if trial_id:
        query += f" and tags.`{TAG_TRIAL}` = '{trial_id}'"
    return client.search_runs([experiment_id], filter_string=query, max_results=5000)


def parent_run(client, experiment_id: str, study: str, key: str, reuse: bool) -> str:
    """The (study, data set) parent run: reused on --resume so a resumed study adds no second parent."""
    if reuse:
        found = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                   filter_string=f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_DATASET}` = '{key}'")
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment_id, tags={TAG_STUDY: study, TAG_DATASET: key, "mlflow.runName": key,
                                                  "mlflow.source.name": Path(sys.argv[0]).name or "mbib.study",
                                                  "mlflow.source.type": "LOCAL"})
    return run.info.run_id


# ---------------------------------------------------------------- results, importances, plots, registry

def collect_rows(result_grid, max_epochs: int) -> list[TrialRow]:
    rows = []
    for res in result_grid:
        df, last = res.metrics_dataframe, res.metrics or {}
        tid = last.get("trial_id") or Path(res.path).name
        params = {k: float(res.config[k]) for k in SEARCH_SPACE}
        evals = df[df[METRIC].notna()] if df is not None and METRIC in df else None
        if evals is None or evals.empty:
            rows.append(TrialRow(tid, _trial_number(tid, res.path), params, float("nan"), 0, "FAIL", None, {}, {}))
            continue
        best = evals.loc[evals[METRIC].idxmax()]
        done = int(df[BUDGET].max())
        state = "FAIL" if res.error else ("COMPLETE" if done >= max_epochs else "PRUNED")
        metrics = {k: float(best[k]) for k in ("acc", "many", "medium", "few") if k in best and _finite(best[k])}
        nodes = ",".join(sorted({n for v in df.get("worker_nodes", []) if isinstance(v, str) for n in v.split(",") if n}))
        rows.append(TrialRow(tid, _trial_number(tid, res.path), params, float(best[METRIC]), done, state,
                             best.get("checkpoint_path") if isinstance(best.get("checkpoint_path"), str) else None,
                             metrics, {int(e): float(a) for e, a in zip(evals[BUDGET], evals[METRIC])}, nodes))
    return sorted(rows, key=lambda r: r.number)


def _trial_number(trial_id: str, trial_dir: str) -> int:
    """Tune names trial folders <trainable>_<trial id>_<number>_<params>: the number orders the trials."""
    head = Path(trial_dir).name.split(f"{trial_id}_", 1)[-1].split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _finite(v) -> bool:
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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(rows: list[TrialRow], path: Path, title: str) -> Path:
    """Best accuracy so far against trial number, every trial's best accuracy marked by how it ended."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    xs = [r.number for r in rows if _finite(r.acc)]
    ys = [r.acc for r in rows if _finite(r.acc)]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.step(xs, best, where="post", color="C3", label="best so far")
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [(r.number, r.acc) for r in rows if r.state == state and _finite(r.acc)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color="C0", label=state.lower())
    ax.set(xlabel="trial", ylabel="test accuracy (%)", title=title)
    ax.legend()
    return _save(fig, plt, path)


def plot_beta(rows: list[TrialRow], path: Path, title: str) -> Path:
    """Accuracy against beta (the paper's Figure 3): every trial, and the mean per unit-wide beta bin."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    pts = sorted((r.params["beta"], r.acc, r.state) for r in rows if _finite(r.acc))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        sel = [(b, a) for b, a, s in pts if s == state]
        if sel:
            ax.scatter(*zip(*sel), marker=marker, color="C0", label=state.lower())
    bins: dict[int, list[float]] = {}
    for b, a, s in pts:
        if s == "COMPLETE":
            bins.setdefault(min(int(round(b)), 5), []).append(a)
    if bins:
        ks = sorted(bins)
        ax.plot(ks, [sum(bins[k]) / len(bins[k]) for k in ks], "-s", color="C3", label="mean, beta rounded")
    ax.set(xlabel="beta", ylabel="test accuracy (%)", xlim=(-0.2, 5.2), title=title)
    ax.legend()
    return _save(fig, plt, path)


def plot_ab_heatmap(rows: list[TrialRow], path: Path, title: str, bins: int = 5) -> Path:
    """Mean accuracy of full-budget trials in a bins x bins grid over (a, b) (the paper's Figure 4), trials on top."""
    import numpy as np

    plt = _plt()
    total, count = np.zeros((bins, bins)), np.zeros((bins, bins))
    for r in rows:
        if r.state == "COMPLETE" and _finite(r.acc):
            i, j = (min(int(r.params[k] * bins), bins - 1) for k in ("b", "a"))
            total[i, j] += r.acc
            count[i, j] += 1
    grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    im = ax.imshow(grid, origin="lower", extent=(0, 1, 0, 1), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="mean test accuracy (%)")
    for r in rows:
        if _finite(r.acc):
            full = r.state == "COMPLETE"  # an "x" has no edge: matplotlib warns when given one
            ax.scatter(r.params["a"], r.params["b"], marker="o" if full else "x", color="w", edgecolors="k" if full else None)
    ax.set(xlabel="a", ylabel="b", title=title)
    return _save(fig, plt, path)


def plot_importances(importances: dict[str, float], basis: str, path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    names = list(importances) or list(SEARCH_SPACE)
    ax.barh(names[::-1], [importances.get(n, 0.0) for n in names[::-1]], color="C2")
    ax.set(xlabel="importance (Optuna)", title=f"{title}\n({basis})")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(client, parent_id: str, key: str, rows: list[TrialRow]) -> tuple[TrialRow | None, dict[str, float]]:
    """Record best trial, optimisation history, importances and the four plots on the parent run."""
    best = best_row(rows)
    importances, basis = param_importances(rows)
    if best is not None:
        tracking.log_params(client, parent_id, {f"best_{k}": v for k, v in best.params.items()}
                            | {"best_trial_id": best.trial_id, "num_trials": len(rows)})
        tracking.log_metrics(client, parent_id, {f"best_{k}": v for k, v in best.metrics.items()}, step=0)
        client.set_tag(parent_id, "mlflow.runName", f"{key} best {best.acc:.1f}")  # visible in the run list
    scores = [r for r in rows if _finite(r.acc)]
    for i, r in enumerate(scores):  # the optimisation history as two metric series over trial number
        so_far = max(x.acc for x in scores[: i + 1])
        tracking.log_metrics(client, parent_id, {"trial_acc": r.acc, "best_acc_so_far": so_far}, step=r.number)
    tracking.log_metrics(client, parent_id, {f"importance_{k}": v for k, v in importances.items()}, step=0)
    client.set_tag(parent_id, "mbib.importance_basis", basis)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        plot_history(rows, d / "best_so_far.png", f"{key}: optimisation history")
        plot_beta(rows, d / "beta_curve.png", f"{key}: accuracy vs beta")
        plot_ab_heatmap(rows, d / "ab_heatmap.png", f"{key}: accuracy over a, b")
        plot_importances(importances, basis, d / "importances.png", f"{key}: parameter importances")
        client.log_artifacts(parent_id, str(d), artifact_path="plots")
        table = [{"trial_id": r.trial_id, "number": r.number, **r.params, "acc": r.acc, "epochs_done": r.epochs_done,
                  "state": r.state, "worker_nodes": r.worker_nodes} for r in rows]
        tracking.write_json({"trials": table, "importances": importances, "importance_basis": basis},
                            d / "study.json")
        client.log_artifact(parent_id, str(d / "study.json"))
    return best, importances


def kept_checkpoint(path: str) -> str:
    """The best report's checkpoint, or, when Ray's num_to_keep broke an accuracy tie the other way and deleted
    it (or a killed writer left it partial), the readable sibling with the highest accuracy (later on ties)."""
    local = Path(path)
    if "://" in path or _checkpoint_acc(local / CHECKPOINT_FILE) is not None:
        return path
    kept = [(acc, k) for k in sorted(local.parent.glob("epoch_*/" + CHECKPOINT_FILE))
            if (acc := _checkpoint_acc(k)) is not None]
    if not kept:
        raise TrainingError(f"no readable checkpoint left under {local.parent}: was the run's storage deleted?")
    return str(max(enumerate(kept), key=lambda ik: (ik[1][0], ik[0]))[1][1].parent)


def _checkpoint_acc(path: Path) -> float | None:
    """The checkpoint's accuracy, or None when it is missing or unreadable (a partial epoch_* folder)."""
    try:
        return float(load_checkpoint(path).get("metrics", {}).get("acc", -1.0))
    except TrainingError:
        return None


def register_best(client, parent_id: str, experiment_id: str, best: TrialRow, model_name: str) -> str:
    """Log the best trial's checkpoint.pt on its child run and register it; once per parent run."""
    done = client.get_run(parent_id).data.tags.get("mbib.registered_version")
    if done:
        return done
    if not best.checkpoint_path:
        raise TrainingError(f"best trial {best.trial_id} has no checkpoint: check runtime.eval_every and storage")
    child = find_child_runs(client, experiment_id, parent_id, best.trial_id)
    run_id = child[0].info.run_id if child else parent_id
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(ray.train.Checkpoint(kept_checkpoint(best.checkpoint_path)).to_directory(tmp)) / CHECKPOINT_FILE
        client.log_artifact(run_id, str(local), artifact_path="model")
    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        client.create_registered_model(model_name, description="best checkpoint of an mbib study (checkpoint.pt)")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(model_name, source=source, run_id=run_id,
                                          tags={"trial_id": best.trial_id, "acc": f"{best.acc:.3f}"}).version
    client.set_tag(parent_id, "mbib.registered_model", model_name)
    client.set_tag(parent_id, "mbib.registered_version", str(version))
    return str(version)


def load_registered_checkpoint(name: str, version: str | int = "latest", tracking_uri: str | None = None,
                               dst_path: str | os.PathLike | None = None) -> Path:
    """Download a registered study model and return its checkpoint.pt (what `mbib export models:/NAME/V` reads)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(tracking_uri)
    dst = str(dst_path or tempfile.mkdtemp(prefix="mbib-model-"))
    try:  # resolve through a client on `uri`: models:/ URIs alone would go to the process-wide registry
        client = MlflowClient(uri, registry_uri=uri)
        if str(version) == "latest":
            version = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        source = client.get_model_version_download_uri(name, str(version))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri))
    except Exception as exc:  # MLflow raises several types for unknown names and versions
        raise ConfigError(f"cannot load models:/{name}/{version} from {uri} ({type(exc).__name__}): "
                          "check the name, version and --tracking-uri") from None
    found = [local] if local.is_file() else sorted(local.rglob(CHECKPOINT_FILE))
    if not found:
        raise ConfigError(f"models:/{name}/{version} holds no {CHECKPOINT_FILE}: register a study checkpoint")
    return found[0]


# ---------------------------------------------------------------- the study

def run_dataset(spec: StudySpec, ds: DatasetSpec, client, experiment_id: str, uri: str,
                resume: bool) -> DatasetOutcome:
    base = spec.base_config(ds)
    epochs = base.optim.epochs
    exp_path = f"{spec.root()}/{ds.key}"
    exists = tune.Tuner.can_restore(exp_path)
    # the trial function only drives Train, whose workers hold the CPUs/GPUs: it asks for memory alone (Ray
    # rejects an all-zero request), so two 1-CPU trials fit a 2-CPU laptop
    trainable = tune.with_resources(run_trial, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    if exists:  # before any MLflow write: a state Tune cannot read leaves the store as it was
        try:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        except Exception as exc:  # unpickling a damaged tuner.pkl/searcher state raises many types
            raise ConfigError(f"--resume: Tune cannot read the study state in {exp_path} ({type(exc).__name__}): "
                              "move that folder away to start afresh, or restore it from a backup") from None
    parent_id = parent_run(client, experiment_id, spec.name, ds.key, reuse=resume)
    if not client.get_run(parent_id).data.params:  # a resumed study keeps its first settings (as Tune's restore does)
        tracking.log_params(client, parent_id, {"study": spec.name, "dataset_key": ds.key, "num_samples": spec.num_samples,
                                                "max_concurrent": spec.max_concurrent, "epochs": epochs,
                                                "gpus_per_trial": spec.gpus_per_trial, "sampler": f"TPE(seed={spec.seed})",
                                                "scheduler": "ASHA", "pruned_trials_told_as": "PRUNED"})
        tracking.log_dataset(client, parent_id, ds.key, base.data)
    logger = MLflowTrialLogger(uri, experiment_id, parent_id, ds.key, epochs)
    if not exists:
        base.runtime.storage_path = f"{spec.root()}/train_runs"
        base.runtime.show_progress = False
        tuner = tune.Tuner(
            trainable,
            param_space={"train": base.to_dict()},
            tune_config=tune.TuneConfig(search_alg=make_searcher(paper_point(base), epochs, spec.seed),
                                        scheduler=make_scheduler(spec, epochs), num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent),
            run_config=tune.RunConfig(name=ds.key, storage_path=spec.root(), verbose=console.tune_verbosity(),
                                      callbacks=[logger, *console.study_callbacks(ds.key, epochs, SEARCH_SPACE)]),
        )
    grid = tuner.fit()
    if parent_id in _LOST:
        raise TrackingLost(f"the MLflow server at {uri} stopped answering during the study ({_LOST[parent_id]}): "
                           f"the trials' results are safe under {exp_path}; when the server is back, rerun with "
                           "--resume and they are logged")
    if (late := logger.backfill(grid)):
        print(f"{ds.key}: logged {late} records the tracking server had missed (tagged {TAG_LATE})")
    rows = collect_rows(grid, epochs)
    best, importances = summarize(client, parent_id, ds.key, rows)
    model_name = version = None
    if best is not None:
        model_name = f"mbib-{ds.key}"
        version = register_best(client, parent_id, experiment_id, best, model_name)
    client.set_terminated(parent_id, "FINISHED")
    return DatasetOutcome(ds.key, exp_path, parent_id, rows, best, importances, model_name, version)


def check_study_state(spec: StudySpec, resume: bool) -> None:
    """Before anything starts or is written: each data set's Tune state is absent, or (--resume) readable and
    made by this study for the same data set and model; otherwise one ConfigError line, nothing touched."""
    for ds in spec.datasets:
        exp_path = f"{spec.root()}/{ds.key}"
        if not tune.Tuner.can_restore(exp_path):
            continue
        if not resume:
            raise ConfigError(f"study data set already exists at {exp_path}: pass --resume to continue it, "
                              "or choose another --storage-path or --name")
        if "://" not in exp_path:  # local state is checked here; remote state when Tune restores it
            _check_own_state(Path(exp_path), spec.base_config(ds))


def _check_own_state(path: Path, base: TrainConfig) -> None:
    what = f"--resume: the study state in {path}"
    states = sorted(path.glob("experiment_state-*.json"))
    try:
        trials = [json.loads(t) for t, _ in json.loads(states[-1].read_text())["trial_data"]] if states else None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{what} is corrupt ({type(exc).__name__}): move that folder away to start afresh, "
                          "or restore it from a backup") from None
    if trials is None:
        raise ConfigError(f"{what} has no experiment_state-*.json: move that folder away to start afresh")
    ours = (base.data.dataset, float(base.data.imbalance_factor), base.model.arch, base.loss.method)
    for trial in trials:
        train = (trial.get("config") or {}).get("train") or {}
        data, model, loss = (train.get(k) or {} for k in ("data", "model", "loss"))
        theirs = (data.get("dataset"), float(data.get("imbalance_factor") or 0), model.get("arch"), loss.get("method"))
        if theirs != ours:
            raise ConfigError(f"{what} belongs to another study ({'/'.join(map(str, theirs))}, this one runs "
                              f"{'/'.join(map(str, ours))}): choose another --name or --storage-path")


def run_study(spec: StudySpec, resume: bool = False) -> list[DatasetOutcome]:
    """Run (or resume) the study on every data set in turn; returns what each data set left in MLflow."""
    from mlflow.tracking import MlflowClient

    check_study_state(spec, resume)
    # evaluation epochs carry "acc", the others only training losses: Tune must not insist on "acc" in each report
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    uri = tracking.tracking_uri(spec.tracking_uri)
    tracking.check_reachable(uri)  # one line before any trial runs, not a retry loop per trial
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(var, value)  # a server that went away costs seconds per call, not minutes
    client = LockPatientClient(MlflowClient(uri))  # another study writing the same SQLite file waits, not dies
    try:
        experiment_id = tracking.get_or_create_experiment(client, spec.name)  # on the driver, before any trial
        ensure_ray(dashboard=True)
        return [run_dataset(spec, ds, client, experiment_id, uri, resume) for ds in spec.datasets]
    except MBIBError:
        raise
    except Exception as exc:
        if not uri.startswith(("http://", "https://")) or not _is_connection_error(exc):
            raise
        raise TrackingLost(f"the MLflow server at {uri} stopped answering ({type(exc).__name__}): when it is back, "
                           "rerun with --resume; finished trials are not rerun and their records are logged then") from None


class TrackingLost(MBIBError):
    """The tracking server went away during a study; Tune's state keeps everything for --resume."""


def _is_connection_error(exc: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (requests.exceptions.RequestException, ConnectionError)) or (
        isinstance(exc, MlflowException) and "API request" in str(exc))


def outcome_json(outcomes: list[DatasetOutcome]) -> str:
    return json.dumps([{"key": o.key, "parent_run_id": o.parent_run_id, "model": o.model_name,
                        "version": o.model_version, "trials": [r.__dict__ for r in o.rows]} for o in outcomes])


# ---------------------------------------------------------------- command line shared by studies/*.py

# enough steps to learn digits in minutes on a laptop CPU (~600 images x 15 epochs at batch 16); the 2-epoch warm-up
# also ramps beta (loss.vsd_warmup_epochs follows it), without which VSD collapses z on a schedule this short
SMOKE_OVERRIDES = {"optim.epochs": 15, "optim.batch_size": 16, "optim.lr": 0.05, "optim.warmup_epochs": 2,
                   "optim.schedule": "cosine", "optim.milestones": "", "optim.milestone_factors": "",
                   "runtime.eval_every": 1, "runtime.cpus_per_worker": 1, "runtime.use_gpu": False}
SMOKE_GRACE_EPOCHS = 5  # ASHA's first rung: digits accuracy says little before the warm-up ends
SMOKE_SUBSET = {"data.limit_train": 600, "data.limit_test": 1000}  # MNIST-LT and CIFAR: digits-lt's size


def smoke_datasets(data_root: str | None = None) -> list[DatasetSpec]:
    """Offline data: subsets of CIFAR-100-LT when present, else MNIST-LT (when its npz is present) and sklearn digits."""
    from mbib.data.cifar import CIFAR100, has_cifar

    root = data_root or os.environ.get("MBIB_DATA_ROOT")
    if root and has_cifar(Path(root), CIFAR100):
        return [DatasetSpec(f"cifar100-lt-if{f}", {"data.dataset": "cifar100-lt", "data.imbalance_factor": f,
                                                  "data.data_root": root, **SMOKE_SUBSET}) for f in (100, 10)]
    out = []
    if root and (Path(root) / "mnist10k.npz").is_file():
        out.append(DatasetSpec("mnist-lt-if10", {"data.dataset": "mnist-lt", "data.imbalance_factor": 10,
                                                 "data.data_root": str(Path(root).resolve()), **SMOKE_SUBSET}))
    # all of it (585 images at IF 10): every shot group of the paper's (>100, 20-100, <20 images) holds classes
    out.append(DatasetSpec("digits-lt-if10", {"data.dataset": "digits-lt", "data.imbalance_factor": 10}))
    return out


def study_parser(prog: str, description: str):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few tiny trials on offline data (minutes on a laptop CPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study from Tune's experiment state")
    p.add_argument("--name", default=None, help="study name: MLflow experiment and folder under --storage-path")
    p.add_argument("--num-samples", type=int, default=None, help="trials per data set")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (the full budget ASHA compares to)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPU fraction per trial (0.25: 4 trials per GPU)")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA's first rung in epochs (default epochs/10)")
    p.add_argument("--seed", type=int, default=0, help="Optuna TPE seed")
    p.add_argument("--storage-path", default=None, help="Tune/Train results, s3://bucket/path on a cluster (default ./mbib_runs)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--data-root", default=None, help="folder holding the data (default $MBIB_DATA_ROOT)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any training setting for every trial, e.g. --set optim.batch_size=256")
    p.add_argument("--verbose", action="store_true", help="Ray's own status boxes and worker logs instead of the trial table")
    return p


def study_spec(args, *, name: str, preset_name: str, datasets: list[DatasetSpec], num_samples: int,
               max_concurrent: int, gpus_per_trial: float) -> StudySpec:
    """The study the shared flags ask for: --smoke swaps in offline data and the smoke schedule, --epochs scales
    the schedule (warm-up, milestones, DRW epoch), --set goes on top."""
    reshape: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    grace_period = args.grace_period
    if args.smoke:
        datasets, preset_name, name = smoke_datasets(args.data_root), "cifar100-lt", f"{name}-smoke"
        reshape = dict(SMOKE_OVERRIDES)
        num_samples, max_concurrent, gpus_per_trial = 4, 2, 0.0
        grace_period = grace_period or SMOKE_GRACE_EPOCHS
    elif args.data_root:
        overrides["data.data_root"] = args.data_root
    overrides.update(parse_sets(args.overrides))
    return StudySpec(name=args.name or name, preset=preset_name, datasets=datasets, overrides=overrides,
                     epochs=args.epochs, reshape=reshape, num_samples=args.num_samples or num_samples,
                     max_concurrent=args.max_concurrent or max_concurrent,
                     gpus_per_trial=gpus_per_trial if args.gpus_per_trial is None else args.gpus_per_trial,
                     grace_period=grace_period, seed=args.seed, storage_path=args.storage_path,
                     tracking_uri=args.tracking_uri)


def study_main(argv, *, prog: str, name: str, preset_name: str, datasets: list[DatasetSpec],
               num_samples: int, max_concurrent: int, gpus_per_trial: float) -> int:
    """Parse the shared study flags, run the study, print where MLflow keeps it; errors as one line."""
    import time

    args = study_parser(prog, f"Ray Tune + Optuna study of MBIB's loss settings ({name})").parse_args(argv)
    console.set_verbose(args.verbose)
    started = time.monotonic()
    try:
        spec = study_spec(args, name=name, preset_name=preset_name, datasets=datasets, num_samples=num_samples,
                          max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial)
        outcomes = run_study(spec, resume=args.resume)
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = tracking.tracking_uri(spec.tracking_uri)
    console.print_study_summary(outcomes, uri, tracking.ui_command(uri), time.monotonic() - started)
    return 0
