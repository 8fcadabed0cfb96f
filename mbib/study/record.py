"""A study's MLflow record: per data set a parent run (best trial, history, importances, plots), per trial a child.

Only the Tune driver writes (SQLite allows one writer). A tracking server that goes away must not stop the trials:
the logger notes why in LOST, and --resume fills in what it missed from Tune's results.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from ray import tune

from mbib import plots, tracking
from mbib.checkpoint import CHECKPOINT_FILE
from mbib.errors import MBIBError, TrainingError
from mbib.storelock import LockPatientClient
from mbib.study.results import TrialRow, finite, param_importances, rows_so_far, trial_number
from mbib.study.spec import BUDGET, METRIC, SEARCH_SPACE, trial_train_config
from mbib.study.trial_files import continue_trial_record
from mbib.mlflow_model import register_image_model
from mbib.tracking.registry import kept_checkpoint
from mbib.train.fit import CHECKPOINT_REPORT

TAG_STUDY, TAG_DATASET, TAG_TRIAL = "mbib.study", "mbib.dataset", "mbib.trial_id"
TAG_LATE = "mbib.logged_on_resume"  # on runs whose records were logged by --resume after the server was away
LOST: dict[str, str] = {}  # parent run id -> why the tracking server stopped answering during this driver


class TrackingLost(MBIBError):
    """The tracking server went away during a study; Tune's state keeps everything for --resume."""


def is_connection_error(exc: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (requests.exceptions.RequestException, ConnectionError)) or (
        isinstance(exc, MlflowException) and "API request" in str(exc))


RESTORED_STORE: dict[str, str] = {}  # data set key -> the store's URI as this driver reaches it (set before restore)


class MLflowTrialLogger(tune.Callback):
    """Each trial a child run nested under the data set's parent run; written by the Tune driver only.

    Child runs are found again by their trial-id tag, so a resumed study reuses them (no duplicates) and skips
    epochs already logged, but not the ones it missed: a driver killed between Tune recording an epoch and this
    logger logging it leaves a gap that --resume's backfill fills from Tune's results, and, for the epoch of the
    checkpoint the trial continues from (which Tune's restored results lack), from the report the trial re-sends.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, dataset_key: str, max_epochs: int):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.dataset_key, self.max_epochs = dataset_key, max_epochs
        self._reset()

    def _reset(self) -> None:
        self._client, self._runs, self._logged, self._drawn = None, {}, {}, False

    def _guarded(self, fn, *args) -> None:
        """A tracking server that goes away must not stop the trials: note why, stop logging; --resume fills in."""
        if self.parent_run_id in LOST:
            return
        try:
            fn(*args)
        except Exception as exc:  # MLflow raises several types for a dead server
            LOST[self.parent_run_id] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            logging.getLogger(__name__).warning("MLflow stopped answering (%s); trials go on, their records are "
                                                "logged by --resume", LOST[self.parent_run_id])

    def __getstate__(self):  # Tune pickles callbacks into the experiment state; clients and caches stay behind
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _logged={})
        return state

    def __setstate__(self, state):  # restored by a driver elsewhere: its store's URI, not the first machine's path
        self.__dict__.update(state)
        self.uri = RESTORED_STORE.get(self.dataset_key, self.uri)
        self._drawn = False  # a restored driver redraws the plots, whatever the pickled logger had drawn

    @property
    def client(self):
        if self._client is None:
            self._client = LockPatientClient(tracking.store_client(self.uri))
        return self._client

    def child_run(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = find_child_runs(self.client, self.experiment_id, self.parent_run_id, tid)
        if found:
            run = found[0]
            self._logged[tid] = {int(m.step) for m in self.client.get_metric_history(run.info.run_id, BUDGET)}
        else:
            number = str(getattr(trial, "experiment_tag", "")).split("_")[0] or tid  # Tune's tag starts with the index
            run = self.client.create_run(self.experiment_id, tags={  # names start with what tells runs apart
                "mlflow.parentRunId": self.parent_run_id, "mlflow.runName": f"#{number} {self.dataset_key}",
                TAG_TRIAL: tid, TAG_DATASET: self.dataset_key})
            self._logged[tid] = set()
        # a run found again may lack what a server lost right after create_run kept from it: add that now
        cfg = trial_train_config(trial.config)
        if not found or not run.data.params:
            tracking.log_params(self.client, run.info.run_id,
                                {**{k: trial.config[k] for k in SEARCH_SPACE}, **cfg.flat()})
        if not found or not run.inputs.dataset_inputs:
            tracking.log_dataset(self.client, run.info.run_id, self.dataset_key, cfg.data)
        self._runs[tid] = run.info.run_id
        return run.info.run_id

    def on_step_begin(self, iteration, trials, **info):
        if not self._drawn:  # once per driver: a resumed study's parent shows the trials that ended before it
            self._drawn = True
            self._draw(trials, None)

    def on_trial_start(self, iteration, trials, trial, **info):
        continue_trial_record(trial)  # runs before Tune's own loggers open the trial's files
        self._guarded(self.child_run, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guarded(self.log_result, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guarded(self.complete, trial)
        self._draw(trials, trial)

    def _draw(self, trials, just_ended) -> None:
        if self.parent_run_id in LOST:
            return
        try:
            self.plot_so_far(trials, just_ended)
        except Exception as exc:  # plots are a view: a failure to draw them must not stop the record
            logging.getLogger(__name__).warning("the parent run's plots were not redrawn (%s: %s)",
                                                type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")

    def plot_so_far(self, trials, just_ended) -> list[TrialRow]:
        """A long study's parent run shows its plots as each trial ends, not only when the study does; returns the
        rows drawn."""
        # the callback may run before Tune marks the trial it reports as ended
        ended = [t for t in trials if t is just_ended or t.status in ("TERMINATED", "ERROR")]
        rows = rows_so_far(ended, self.max_epochs)
        if rows:
            log_plots(self.client, self.parent_run_id, self.dataset_key, rows, *param_importances(rows),
                      so_far=f" ({len(rows)} of {len(trials)} trials ended)")
        return rows

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guarded(lambda: self.client.set_terminated(self.child_run(trial), "FAILED"))

    def log_result(self, trial, result: dict) -> bool:
        run_id, step = self.child_run(trial), int(result.get(BUDGET, 0))
        earlier = result.get(CHECKPOINT_REPORT)
        if isinstance(earlier, str):  # a restored trial re-sends its checkpoint epoch's report: log it if missing
            report = json.loads(earlier)
            self.log_result(trial, {**report, BUDGET: int(report["epoch"]) + 1})
        if step in self._logged[trial.trial_id]:
            return False  # logged before the driver was interrupted
        tracking.log_metrics(self.client, run_id, {k: v for k, v in result.items() if k not in _TUNE_KEYS}, step=step)
        self._logged[trial.trial_id].add(step)
        return True

    def complete(self, trial) -> bool:
        run_id = self.child_run(trial)
        run = self.client.get_run(run_id)
        if run.info.status == "FINISHED":
            return False  # finished before an interruption that came before Tune saved its state: keep the record
        done = int((trial.last_result or {}).get(BUDGET, 0))
        self.client.set_tag(run_id, "mbib.stopped_early", str(done < self.max_epochs).lower())
        accs = [m.value for m in self.client.get_metric_history(run_id, METRIC)]
        if accs:  # the run list shows names without configuring columns: the selection score goes there too
            self.client.set_tag(run_id, "mlflow.runName", f"{run.info.run_name} sel {max(accs):.1f}")
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
                                    experiment_tag=str(trial_number(tid, res.path)))
            rows = [{k: v.item() if hasattr(v, "item") else v for k, v in r.items() if not str(k).startswith("config/")}
                    for r in df.to_dict("records")]
            late = sum(self.log_result(trial, {k: v for k, v in r.items() if finite(v)}) for r in rows)
            late += 0 if res.error else self.complete(trial)
            if late:
                self.client.set_tag(self.child_run(trial), TAG_LATE, f"{late} records logged by --resume (the "
                                    "tracking server was away, or the driver died, when the trial reported them)")
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


def log_summary(client, parent_id: str, key: str, rows: list[TrialRow], best: TrialRow | None,
                importances: dict[str, float], basis: str, selection: tuple[str, str]) -> None:
    """Record the best trial (chosen by selection score; its chosen epoch's numbers), the optimisation history,
    importances and the four plots on the parent run, with which split selected and which reports."""
    client.set_tag(parent_id, "mbib.selected_on", selection[0])
    client.set_tag(parent_id, "mbib.reported_on", selection[1])
    if best is not None:
        tracking.log_params(client, parent_id, {f"best_{k}": v for k, v in best.params.items()}
                            | {"best_trial_id": best.trial_id, "best_epoch": best.epoch, "num_trials": len(rows)})
        tracking.log_metrics(client, parent_id, {f"best_{k}": v for k, v in best.metrics.items()}, step=0)
        shown = best.metrics.get("heldout_acc", best.metrics.get("acc", best.score))
        client.set_tag(parent_id, "mlflow.runName", f"{key} best sel {best.score:.1f} report {shown:.1f}")
    scores = [r for r in rows if finite(r.score)]
    for i, r in enumerate(scores):  # the optimisation history (selection scores) as two series over trial number
        so_far = max(x.score for x in scores[: i + 1])
        tracking.log_metrics(client, parent_id, {"trial_select_acc": r.score, "best_select_acc_so_far": so_far},
                             step=r.number)
    tracking.log_metrics(client, parent_id, {f"importance_{k}": v for k, v in importances.items()}, step=0)
    client.set_tag(parent_id, "mbib.importance_basis", basis)
    log_plots(client, parent_id, key, rows, importances, basis)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        table = [{"trial_id": r.trial_id, "number": r.number, **r.params, "select_acc": r.score,
                  "chosen_epoch": r.epoch, **r.metrics, "epochs_done": r.epochs_done, "state": r.state,
                  "worker_nodes": r.worker_nodes} for r in rows]
        tracking.write_json({"selected_on": selection[0], "reported_on": selection[1],
                             "best_trial_id": best.trial_id if best else None, "trials": table,
                             "importances": importances, "importance_basis": basis}, d / "study.json")
        client.log_artifact(parent_id, str(d / "study.json"))


def log_plots(client, parent_id: str, key: str, rows: list[TrialRow], importances: dict[str, float], basis: str,
              so_far: str = "") -> None:
    """The parent run's four plots (history, beta, a-b heatmap, importances); `so_far` marks a study in flight."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        plots.plot_history(rows, d / "best_so_far.png", f"{key}: optimisation history{so_far}")
        plots.plot_beta(rows, d / "beta_curve.png", f"{key}: accuracy vs beta{so_far}")
        plots.plot_ab_heatmap(rows, d / "ab_heatmap.png", f"{key}: accuracy over a, b{so_far}")
        plots.plot_importances(importances, basis, d / "importances.png", f"{key}: parameter importances{so_far}",
                               list(SEARCH_SPACE))
        client.log_artifacts(parent_id, str(d), artifact_path="plots")


def register_best(client, parent_id: str, experiment_id: str, best: TrialRow, model_name: str) -> str:
    """Log the best trial's chosen epoch as an MLflow Model on its child run and register it; once per parent run."""
    import ray.train

    done = client.get_run(parent_id).data.tags.get("mbib.registered_version")
    if done:
        return done
    if not best.checkpoint_path:
        raise TrainingError(f"best trial {best.trial_id} has no checkpoint: check runtime.eval_every and storage")
    child = find_child_runs(client, experiment_id, parent_id, best.trial_id)
    run_id = child[0].info.run_id if child else parent_id
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(ray.train.Checkpoint(kept_checkpoint(best.checkpoint_path)).to_directory(tmp)) / CHECKPOINT_FILE
        version = register_image_model(
            client, run_id, local, model_name,
            description="best trial of an mbib study: an MLflow Model (pyfunc over its ONNX export, taking images), "
                        "its checkpoint.pt beside it",
            metadata={"trial_id": best.trial_id, "epoch": best.epoch, "select_acc": best.score},
            tags={"trial_id": best.trial_id, "epoch": str(best.epoch), "select_acc": f"{best.score:.3f}",
                  **{k: f"{v:.3f}" for k, v in best.metrics.items() if k.startswith("heldout_")}})
    client.set_tag(parent_id, "mbib.registered_model", model_name)
    client.set_tag(parent_id, "mbib.registered_version", str(version))
    return str(version)
