"""The selection split: which test images choose epochs and trials, and what a study reports from it."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mbib.data.split import selection_mask
from mbib.study.results import TrialRow, best_row, collect_rows
from mbib.train.engine import device_options

PARAMS = {"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0}


def test_selection_mask_is_stratified_disjoint_and_fixed_by_its_seed():
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    mask = selection_mask(labels, 0.5, seed=0)
    # half of every class selects, the other half is held out: both parts stay balanced
    assert torch.bincount(labels[mask], minlength=10).tolist() == [50] * 10
    assert torch.bincount(labels[~mask], minlength=10).tolist() == [50] * 10
    assert torch.equal(mask, selection_mask(labels, 0.5, seed=0))  # the same images every time
    assert not torch.equal(mask, selection_mask(labels, 0.5, seed=1))  # the seed chooses which
    odd = selection_mask(torch.tensor([0, 0, 0, 1]), 0.5)
    assert odd[:3].sum() == 2 and odd[3]  # half, rounded up: a one-image class still selects
    assert selection_mask(labels, 0.0).all()  # off: the whole test set selects


def test_selection_split_must_leave_images_to_report():
    from mbib.config import TrainConfig, apply_overrides
    from mbib.errors import ConfigError

    with pytest.raises(ConfigError, match="data.selection_split must be in"):
        apply_overrides(TrainConfig(), {"data.selection_split": 1.0})


def test_engine_scores_each_part_on_its_own_images():
    from mbib.config import TrainConfig, apply_overrides
    from mbib.data.source import Shard, open_source
    from mbib.train.engine import Engine, load_data

    cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                          "data.selection_split": 0.5, "data.selection_seed": 3,
                                          "runtime.amp": False, "runtime.compile": False})
    engine = Engine(cfg, load_data(cfg), torch.device("cpu"))
    m = engine.evaluate(batch_size=37).metrics()  # batches that cut across classes and the split
    # the same numbers computed here, image by image, from the network's predictions and the mask
    source = open_source(engine.data, Shard(torch.device("cpu"), 0, 1, False), batch_size=64, seed=0)
    with torch.inference_mode():
        engine.task.network.eval()
        from mbib.models import ensemble_logits

        pred = torch.cat([ensemble_logits(engine.task.network(x)).argmax(1) for x, _ in source.test_batches(64)])
    y = engine.data.y_test
    mask = selection_mask(y, 0.5, seed=3)
    right = (pred == y).double()
    assert m["select_acc"] == pytest.approx(100 * right[mask].mean().item())
    assert m["heldout_acc"] == pytest.approx(100 * right[~mask].mean().item())
    assert m["acc"] == pytest.approx(100 * right.mean().item())
    assert {"heldout_many", "heldout_medium", "heldout_few"} <= set(m)


class _StubEngine:
    """The three evaluations of a run whose whole-test accuracy peaks later than its selection score."""

    def __init__(self, cfg, evals):
        self.cfg, self.evals = cfg, iter(evals)
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
        self.opts = device_options(torch.device("cpu"), amp=False, channels_last=False)  # its legs' device

    def run_epoch(self, epoch):
        return {}

    def param_checksum(self):
        return 0.0

    def evaluate(self):
        from mbib.train.engine import EvalResult

        acc, sel, held = next(self.evals)
        return EvalResult(acc, 0.0, 0.0, 0.0, {}, torch.zeros(2, 2), {"select_acc": sel, "heldout_acc": held})

    def state_dict(self):
        return {}


def test_a_runs_best_epoch_is_chosen_on_the_selection_split():
    from mbib.config import TrainConfig, apply_overrides
    from mbib.train.fit import Progress, fit

    cfg = apply_overrides(TrainConfig(), {"optim.epochs": 3, "runtime.eval_every": 1})
    progress, reports = Progress(), []
    fit(_StubEngine(cfg, [(50.0, 60.0, 40.0), (70.0, 55.0, 85.0), (60.0, 58.0, 62.0)]), progress,
        lambda metrics, state: reports.append(metrics))
    assert progress.best_metrics["epoch"] == 0 and progress.best == 60.0  # not epoch 1, the whole test set's best
    assert [r["best_acc"] for r in reports] == [60.0, 60.0, 60.0]


def _result(trial_id, number, rows, error=None, path=None):
    df = pd.DataFrame(rows)
    df["trial_id"] = trial_id
    return SimpleNamespace(metrics_dataframe=df, metrics={"trial_id": trial_id}, config=PARAMS, error=error,
                           path=path or f"/runs/study/run_trial_{trial_id}_{number:05d}_beta=5")


def _eval(done, sel, acc, held=None, ckpt=None):
    return {"epochs_done": done, "select_acc": sel, "acc": acc, "heldout_acc": held if held is not None else acc,
            "checkpoint_path": ckpt or f"/runs/train/epoch_{done - 1:04d}"}


def test_rows_take_the_best_selection_epoch_whatever_came_after():
    grid = [
        # the best selection score at epoch 2 of 4; the whole test set peaks at epoch 4
        _result("a", 1, [_eval(1, 40.0, 41.0), _eval(2, 70.0, 60.0, 58.0), {"epochs_done": 3},
                         _eval(4, 65.0, 75.0)]),
        # NaN evaluations are skipped, not taken as the best; of two equal scores the later one counts
        _result("b", 2, [_eval(1, float("nan"), 10.0), _eval(2, 30.0, 31.0), _eval(3, 30.0, 33.0),
                         _eval(4, float("nan"), 90.0)]),
        # stopped by ASHA after 2 of 4 epochs, with the highest score of all
        _result("c", 3, [_eval(1, 50.0, 50.0), _eval(2, 95.0, 95.0)]),
        # raised after its first evaluation
        _result("d", 4, [_eval(1, 99.0, 99.0)], error=RuntimeError("worker died")),
        # never evaluated
        _result("e", 5, [{"epochs_done": 1}]),
    ]
    a, b, c, d, e = collect_rows(grid, max_epochs=4)
    assert (a.score, a.epoch, a.epochs_done, a.state) == (70.0, 2, 4, "COMPLETE")
    assert a.checkpoint_path == "/runs/train/epoch_0001" and a.metrics["heldout_acc"] == 58.0
    assert a.intermediate == {1: 40.0, 2: 70.0, 4: 65.0}
    assert (b.score, b.epoch, b.state, b.metrics["acc"]) == (30.0, 3, "COMPLETE", 33.0)
    assert (c.score, c.epochs_done, c.state) == (95.0, 2, "PRUNED")
    assert (d.state, d.score) == ("FAIL", 99.0)
    assert e.state == "PRUNED" and math.isnan(e.score) and e.checkpoint_path is None
    # the best trial: the highest selection score among the full-budget ones; a stopped, failed or
    # never-evaluated trial never wins over one
    assert best_row([a, b, c, d, e]) is a
    assert best_row([c, d, e]) is c  # no full-budget trial: the best stopped one
    assert best_row([d, e]) is None


def test_the_best_trial_is_ranked_by_selection_score_not_the_whole_test_set():
    hi_sel = TrialRow("s", 1, PARAMS, 60.0, 4, "COMPLETE", "x", {"acc": 50.0}, {})
    hi_test = TrialRow("t", 2, PARAMS, 55.0, 4, "COMPLETE", "y", {"acc": 80.0}, {})
    assert best_row([hi_test, hi_sel]) is hi_sel


def test_equal_selection_scores_go_to_the_earlier_trial_in_any_order():
    first = TrialRow("p", 1, PARAMS, 60.0, 4, "COMPLETE", "x", {}, {})
    later = TrialRow("q", 2, PARAMS, 60.0, 4, "COMPLETE", "y", {}, {})
    assert best_row([later, first]) is first and best_row([first, later]) is first


def test_study_trials_select_on_half_the_test_set_unless_told_otherwise():
    from mbib.study.cli import study_parser, study_spec
    from mbib.study.spec import DatasetSpec

    ds = [DatasetSpec("cifar100-lt-if100", {"data.dataset": "cifar100-lt"})]
    for argv, split in (([], 0.5), (["--selection-split", "0"], 0.0), (["--set", "data.selection_split=0.25"], 0.25)):
        args = study_parser("s", "").parse_args(argv)
        spec = study_spec(args, name="s", preset_name="cifar100-lt", datasets=ds, num_samples=1, max_concurrent=1,
                          gpus_per_trial=0.0)
        assert spec.base_config(ds[0]).data.selection_split == split, argv


def test_the_live_table_shows_the_best_selection_epoch_and_its_held_out_numbers():
    from mbib.study.console import StudyConsole

    table = StudyConsole("k", 4, tuple(PARAMS))
    table._refresh = lambda finished=None, evaluated=None: None  # no terminal here: the rows are what is checked
    trial = SimpleNamespace(trial_id="t", config=PARAMS, path=None)
    for done, sel, acc, held in ((1, 50.0, 51.0, 49.0), (2, 70.0, 60.0, 61.0), (3, None, None, None),
                                 (4, 65.0, 80.0, 79.0)):
        table.on_trial_result(0, [], trial, {"epochs_done": done, **({} if sel is None else {
            "select_acc": sel, "acc": acc, "heldout_acc": held, "heldout_many": 1.0})})
    row = table.rows["t"]
    assert (row["epoch"], row["score"], row["at"], row["acc"], row["many"]) == (4, 70.0, 2, 61.0, 1.0)
    assert "held-out split" in table._table().title


def test_a_study_logged_to_a_file_prints_a_line_per_evaluation():
    import io

    from rich.console import Console

    from mbib.study.console import StudyConsole

    table = StudyConsole("k", 4, tuple(PARAMS))
    out = io.StringIO()
    table.console = Console(file=out, force_terminal=False, width=200)  # a log file, not a terminal
    trial = SimpleNamespace(trial_id="t", config=PARAMS, path=None)
    table.on_trial_result(0, [], trial, {"epochs_done": 1, "select_acc": 50.0})
    table.on_trial_result(0, [], trial, {"epochs_done": 2})  # not an evaluation: no line
    table.on_trial_result(0, [], trial, {"epochs_done": 3, "select_acc": 40.0})
    assert out.getvalue().splitlines() == ["k trial 1: epoch 1/4, selection score 50.0 (best 50.0 at epoch 1)",
                                           "k trial 1: epoch 3/4, selection score 40.0 (best 50.0 at epoch 1)"]


def test_a_resumed_drivers_console_starts_each_trial_from_its_earlier_reports(tmp_path):
    import io
    import json

    from rich.console import Console

    from mbib.study.console import StudyConsole

    folder = tmp_path / "run_trial_t_8_a=0.1"
    folder.mkdir()
    reports = [{"epochs_done": 5, "select_acc": 31.0, "heldout_acc": 30.7, "trial_id": "t"},
               {"epochs_done": 10, "select_acc": 29.0, "heldout_acc": 29.5, "trial_id": "t"}]
    (folder / "result.json").write_text("".join(json.dumps({**r, "config": PARAMS}) + "\n" for r in reports))
    table = StudyConsole("k", 20, tuple(PARAMS))
    out = io.StringIO()
    table.console = Console(file=out, force_terminal=False, width=200)
    trial = SimpleNamespace(trial_id="t", config=PARAMS, path=str(folder), local_path=None)
    table.on_trial_result(0, [], trial, {"epochs_done": 15, "select_acc": 30.0})
    assert out.getvalue().splitlines() == ["k trial 8: epoch 15/20, selection score 30.0 (best 31.0 at epoch 5)"]


def test_a_moved_study_finds_the_checkpoints_of_trials_that_ended_before_the_move(tmp_path):
    from mbib.study.results import checkpoint_here

    root = tmp_path / "clone" / "runs" / "study"
    (root / "train_runs" / "9d381753" / "epoch_0199").mkdir(parents=True)
    old = "/elsewhere/first-machine/runs/study/train_runs/9d381753/epoch_0199"  # what the trial's result recorded
    assert checkpoint_here(old, str(root)) == str(root / "train_runs" / "9d381753" / "epoch_0199")
    here = str(root / "train_runs" / "9d381753" / "epoch_0199")
    assert checkpoint_here(here, str(root)) == here  # a path that exists stays
    for kept in ("s3://bucket/runs/study/train_runs/x/epoch_0001", "/gone/not/a/train/run", None):
        assert checkpoint_here(kept, str(root)) == kept  # remote, foreign or absent: left for the caller to report


def test_a_stopped_fit_counts_its_unended_and_never_created_trials():
    from mbib.study.results import unfinished

    assert unfinished(["TERMINATED"] * 5 + ["ERROR", "RUNNING"], 8) == 2  # one running, one never created
    assert unfinished(["TERMINATED", "PENDING", "PAUSED"], 3) == 2
    assert unfinished(["TERMINATED"] * 7 + ["ERROR"], 8) == 0
