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


def test_study_summary_says_which_split_selected_and_which_reported(capsys):
    params = {"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0}
    best = TrialRow("t0", 1, params, 84.0, 15, "COMPLETE", None,
                    {"acc": 83.0, "heldout_acc": 82.0, "heldout_many": 98.3, "heldout_few": 70.0, "epochs_done": 12}, {})
    stopped = TrialRow("t1", 2, params, 40.0, 5, "PRUNED", None, {"acc": 40.0}, {})
    outcome = DatasetOutcome("digits-lt-if10", "", "run", [best, stopped], best, {}, "mbib-digits-lt-if10", "1",
                             ("the selection split", "the held-out split"))
    study_console.print_study_summary([outcome], "sqlite:///x/mlflow.db", "mlflow ui --backend-store-uri sqlite:///x/mlflow.db", 190)
    out = capsys.readouterr().out
    assert "digits-lt-if10: 2 trials, 1 stopped early by ASHA" in out
    assert "best: trial 1, chosen at epoch 12 of 15 by selection score 84.0% on the selection split" in out
    # the held-out number of the chosen epoch is the one reported; medium had no value
    assert "report: accuracy 82.0% (many 98.3, medium n/a, few 70.0) on the held-out split; whole test set 83.0%" in out
    assert "models:/mbib-digits-lt-if10/1 (epoch 12)" in out and "study took 3.2 min" in out
    assert "mlflow ui --backend-store-uri sqlite:///x/mlflow.db" in out


def test_smoke_study_is_named_after_the_data_it_trains_on():
    from mbib.study.cli import smoke_name
    from mbib.study.spec import DatasetSpec

    digits = DatasetSpec("digits-lt-if10", {"data.dataset": "digits-lt"})
    mnist = DatasetSpec("mnist-lt-if10", {"data.dataset": "mnist-lt"})
    assert smoke_name([digits]) == "digits-lt-mbib-smoke"
    assert smoke_name([mnist, digits]) == "mnist-lt+digits-lt-mbib-smoke"


def test_eta_is_the_legs_mean_epoch_time_times_the_epochs_left():
    assert console.eta(300.0, 2, 3) == "8 min"  # 150 s x 3 = 450 s
    assert console.eta(60.0, 3, 4) == "80 s" and console.eta(100.0, 1, 0) == "0 s"
    assert console.eta(150.0, 1, 190) == "7.9 h" and console.eta(0.0, 0, 10) == "?"


def test_a_legs_time_left_leaves_out_its_slow_first_epoch():
    # first epoch 160 s (warm-up), then three of 30 s: 146 left x 30 s = 73 min, not 146 x 62.5 s = 2.5 h
    assert console.leg_eta(0.0, 160.0, 250.0, 4, 146) == "73 min"
    assert console.leg_eta(0.0, 160.0, 160.0, 1, 146) == "6.5 h"  # one epoch so far: all there is to go by
