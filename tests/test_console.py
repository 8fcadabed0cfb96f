"""The console's pure parts: metric formatting, which Ray worker-log lines reach the terminal, the study summary."""

import math
import os
from unittest import mock

import pytest
from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

from mbib import console
from mbib.study import console as study_console
from mbib.study.results import DatasetOutcome, TrialRow

CLEANER_TRACEBACK = ["Exception in thread Thread-2 (_monitor_loop):", "Traceback (most recent call last):",
                     "  File \"placement_group_cleaner.py\", line 80, in _monitor_loop",
                     "ray.exceptions.GetTimeoutError: Timed out while waiting for GCS"]


@pytest.fixture
def quiet():
    with mock.patch.dict(os.environ):  # set_verbose sets Ray's and MLflow's output variables for this process
        console.set_verbose(False)
        yield
        console.set_verbose(False)


def test_fmt_says_n_a_for_missing_and_nan():
    assert console.fmt(math.nan) == "n/a" and console.fmt(None) == "n/a" and console.fmt(math.inf) == "n/a"
    assert console.fmt(83.333) == "83.3" and console.fmt(0.25, 2) == "0.25"


def test_quiet_mode_keeps_only_progress_bars(quiet):
    bar = f"{RAY_TQDM_MAGIC}{{\"x\": 1}}"
    assert console.shown_lines("RayTrainWorker", ["epoch 3 done", bar, "a warning"]) == [bar]
    assert console.shown_lines("PlacementGroupCleaner", CLEANER_TRACEBACK) == []
    assert console.shown_lines("raylet", ["Task was killed due to the node running low on memory."]) != []
    assert console.shown_lines("raylet", ["WARNING: 8 PYTHON worker processes have been started on node"]) == []
    assert console.tune_verbosity() == 0 and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"


def test_verbose_mode_shows_worker_logs_but_not_the_cleaners_gcs_traceback(quiet):
    console.set_verbose(True)
    assert console.shown_lines("RayTrainWorker", ["epoch 3 done", "a warning"]) == ["epoch 3 done", "a warning"]
    assert console.shown_lines("PlacementGroupCleaner", CLEANER_TRACEBACK) == []
    assert console.shown_lines("PlacementGroupCleaner", ["Detected that the controller is dead"]) != []
    assert console.tune_verbosity() == 2


def test_study_summary_shows_best_trial_n_a_for_empty_groups_and_the_mlflow_command(capsys):
    params = {"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0}
    best = TrialRow("t0", 1, params, 84.0, 15, "COMPLETE", None, {"acc": 84.0, "many": 98.3, "few": 70.0}, {})
    stopped = TrialRow("t1", 2, params, 40.0, 5, "PRUNED", None, {"acc": 40.0}, {})
    outcome = DatasetOutcome("digits-lt-if10", "", "run", [best, stopped], best, {}, "mbib-digits-lt-if10", "1")
    study_console.print_study_summary([outcome], "sqlite:///x/mlflow.db", "mlflow ui --backend-store-uri sqlite:///x/mlflow.db", 190)
    out = capsys.readouterr().out
    assert "digits-lt-if10: 2 trials, 1 stopped early by ASHA" in out
    assert "best: trial 1, accuracy 84.0% (many 98.3, medium n/a, few 70.0) after 15 epochs" in out  # medium had no value
    assert "models:/mbib-digits-lt-if10/1" in out and "study took 3.2 min" in out
    assert "mlflow ui --backend-store-uri sqlite:///x/mlflow.db" in out


def test_study_table_survives_tunes_pickling_and_shows_n_a_for_an_empty_group(quiet):
    import io
    import pickle
    from types import SimpleNamespace

    from rich.console import Console

    table = study_console.study_callbacks("digits-lt-if10", 15, ("beta", "a"))[0]
    table.console = Console(file=io.StringIO(), force_terminal=True, width=80)  # a terminal: the live display starts
    trial = SimpleNamespace(trial_id="abc", config={"beta": 5.0, "a": 0.1})
    table.on_trial_start(0, [], trial)
    table.on_trial_result(0, [], trial, {"epochs_done": 5, "acc": 41.0, "many": 90.0, "medium": math.nan, "few": 10.0})
    assert table.live is not None
    copy = pickle.loads(pickle.dumps(table))  # Tune saves callbacks with its experiment state
    assert copy.live is None and copy.rows["abc"]["acc"] == 41.0
    table.on_trial_complete(0, [], trial)
    table.on_experiment_end([])
    out = table.console.file.getvalue()
    assert "stopped" in out and "n/a" in out and "41.0" in out


def test_a_failed_trial_is_told_in_one_line():
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nray.train.WorkerGroupError: Training failed\n" \
            "mbib.errors.DataError: digits-lt needs scikit-learn: pip install scikit-learn\n"
    assert console.error_line(trace) == "mbib.errors.DataError: digits-lt needs scikit-learn: pip install scikit-learn"
    oom = trace + "5 worker(s) were killed due to the node running low on memory.\n"
    assert console.error_line(oom).startswith("out of memory")
