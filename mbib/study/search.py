"""Search and trials: a Tune trial fits one Ray Train run; Optuna TPE proposes, ASHA stops the weak ones."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from mbib import console, tracking
from mbib.study.console import study_callbacks
from mbib.config import TrainConfig
from mbib.data.split import describe_split
from mbib.errors import ConfigError, MBIBError
from mbib.raylocal import ensure_ray
from mbib.storelock import LockPatientClient
from mbib.tracking.moved import follow_moved_store
from mbib.study.results import (DatasetOutcome, best_row, checkpoint_here, collect_rows, param_importances,
                                 unfinished)
from mbib.study.spec import BUDGET, METRIC, SEARCH_SPACE, DatasetSpec, StudySpec, paper_point, trial_train_config
from mbib.study.record import (LOST, RESTORED_STORE, TAG_LATE, MLflowTrialLogger, TrackingLost, is_connection_error, log_summary,
                               parent_run, register_best)

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial function


class StudyStopped(MBIBError):
    """The study was stopped (Ctrl-C) before every trial ended: nothing is summarised or registered."""


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

    cfg = moved_with_the_study(trial_train_config(config), study_root_now())
    cfg.run_name = tune.get_context().get_trial_id()  # a restored trial finds its Train run and resumes it
    nodes = WorkerNodes()
    build_trainer(cfg, [StudyReportCallback(nodes), nodes]).fit()


def study_root_now() -> str | None:
    """The study's folder as this trial's Tune storage has it (after a move, the new one); None when it is remote."""
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal.session import get_session  # Tune has no public accessor for a trial's storage

    storage = get_session().storage
    if not isinstance(storage.storage_filesystem, LocalFileSystem):
        return None
    return str(Path(storage.experiment_fs_path).parent)  # experiments are <root>/<data set key>


def moved_with_the_study(cfg: TrainConfig, root: str | None) -> TrainConfig:
    """A trial's config holds the absolute paths of the machine the study started on; a study resumed from another
    folder or machine trains where its state is now: Train runs beside the Tune experiments (`<root>/train_runs`),
    data from $MBIB_DATA_ROOT when the first data root is gone."""
    rt, data = cfg.runtime, cfg.data
    if root and rt.storage_path and "://" not in rt.storage_path:
        rt.storage_path = str(Path(root) / "train_runs")
    if data.data_root and not Path(data.data_root).exists() and os.environ.get("MBIB_DATA_ROOT"):
        data.data_root = str(Path(os.environ["MBIB_DATA_ROOT"]).resolve())
    return cfg


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


def run_dataset(spec: StudySpec, ds: DatasetSpec, client, experiment_id: str, uri: str,
                resume: bool) -> DatasetOutcome:
    base = spec.base_config(ds)
    epochs = base.optim.epochs
    exp_path = f"{spec.root()}/{ds.key}"
    exists = tune.Tuner.can_restore(exp_path)
    # the trial function only drives Train, whose workers hold the CPUs/GPUs: it asks for memory alone (Ray
    # rejects an all-zero request), so two 1-CPU trials fit a 2-CPU laptop
    trainable = tune.with_resources(run_trial, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    RESTORED_STORE[ds.key] = uri  # a study moved with its store logs to the store where it is now
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
                                                "scheduler": "ASHA", "pruned_trials_told_as": "PRUNED",
                                                "selection_split": base.data.selection_split,
                                                "selection_seed": base.data.selection_seed, "selected_by": METRIC})
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
                                      callbacks=[logger, *study_callbacks(ds.key, epochs, SEARCH_SPACE)]),
        )
    grid = tuner.fit()
    if parent_id in LOST:
        raise TrackingLost(f"the MLflow server at {uri} stopped answering during the study ({LOST[parent_id]}): "
                           f"the trials' results are safe under {exp_path}; when the server is back, rerun with "
                           "--resume and they are logged")
    if (late := logger.backfill(grid)):
        print(f"{ds.key}: logged {late} records the tracking server had missed (tagged {TAG_LATE})")
    # Ctrl-C ends Tune's loop quietly: its state saved then says which trials had not ended (remote: only the count)
    saved = saved_trials(Path(exp_path)) if "://" not in exp_path else None
    statuses = [t.get("status", "") for t in saved] if saved is not None else ["TERMINATED"] * len(grid)
    if (left := unfinished(statuses, spec.num_samples)):
        raise StudyStopped(f"{ds.key}: stopped with {left} of {spec.num_samples} trials unfinished, so nothing is "
                           f"summarised or registered; the state is safe under {exp_path}: rerun with --resume")
    # a study that moved (another folder or machine) finds the checkpoints of trials that ended before the move
    rows = [replace(r, checkpoint_path=checkpoint_here(r.checkpoint_path, spec.root()))
            for r in collect_rows(grid, epochs)]
    best, (importances, basis) = best_row(rows), param_importances(rows)
    selection = describe_split(base.data.selection_split, base.data.selection_seed)
    log_summary(client, parent_id, ds.key, rows, best, importances, basis, selection)
    model_name = version = None
    if best is not None:
        model_name = f"mbib-{ds.key}"
        version = register_best(client, parent_id, experiment_id, best, model_name)
    client.set_terminated(parent_id, "FINISHED")
    return DatasetOutcome(ds.key, exp_path, parent_id, rows, best, importances, model_name, version, selection)


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


def saved_trials(path: Path) -> list[dict] | None:
    """The trials in Tune's newest saved experiment state under `path` (None without one)."""
    states = sorted(path.glob("experiment_state-*.json"))  # named by the driver's start time: the last is the newest
    return [json.loads(t) for t, _ in json.loads(states[-1].read_text())["trial_data"]] if states else None


def _check_own_state(path: Path, base: TrainConfig) -> None:
    what = f"--resume: the study state in {path}"
    try:
        trials = saved_trials(path)
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
    check_study_state(spec, resume)
    # evaluation epochs carry "acc", the others only training losses: Tune must not insist on "acc" in each report
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    uri = tracking.tracking_uri(spec.tracking_uri)
    tracking.check_reachable(uri)  # one line before any trial runs, not a retry loop per trial
    if resume and (moved := follow_moved_store(uri)):
        print(f"the MLflow store moved: {moved} artifact paths now point beside {uri.split('///')[-1]}")
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(var, value)  # a server that went away costs seconds per call, not minutes
    client = LockPatientClient(tracking.store_client(uri))  # another study writing the same SQLite file waits, not dies
    try:
        experiment_id = tracking.get_or_create_experiment(client, spec.name)  # on the driver, before any trial
        ensure_ray(dashboard=True)
        return [run_dataset(spec, ds, client, experiment_id, uri, resume) for ds in spec.datasets]
    except MBIBError:
        raise
    except Exception as exc:
        if not uri.startswith(("http://", "https://")) or not is_connection_error(exc):
            raise
        raise TrackingLost(f"the MLflow server at {uri} stopped answering ({type(exc).__name__}): when it is back, "
                           "rerun with --resume; finished trials are not rerun and their records are logged then") from None
