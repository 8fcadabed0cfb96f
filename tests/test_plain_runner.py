"""The Ray-free runner: same engine and loop; an interrupted run continued from its checkpoint file equals an
uninterrupted one; a reproduction grid runs through it without Ray or MLflow."""

import json
import re

import pytest
import torch

from mbib.checkpoint import load_checkpoint, save_checkpoint
from mbib.reproduction import run
from mbib.reproduction.state import State, cell_claim
from mbib.reproduction.cli import main as reproduce_main
from mbib.config import TrainConfig, apply_overrides
from mbib.train.engine import device_options, precision_label
from mbib.train.fit import InjectedFault, add_leg
from mbib.train.plain import run_plain


def tiny(**extra) -> TrainConfig:
    return apply_overrides(TrainConfig(), {
        "data.dataset": "digits-lt", "data.imbalance_factor": 10, "data.limit_train": 96, "data.limit_test": 30,
        "optim.epochs": 3, "optim.batch_size": 32, "optim.warmup_epochs": 0.5, "runtime.eval_every": 1,
        "runtime.cpus_per_worker": 1, **extra})


def test_continued_run_equals_uninterrupted(tmp_path):
    whole = run_plain(tiny(), tmp_path / "whole.pt", log=lambda _: None)
    with pytest.raises(InjectedFault):  # dies after epoch 1's checkpoint
        run_plain(tiny(**{"runtime.inject_failure_epoch": 1}), tmp_path / "cut.pt", log=lambda _: None)
    lines = []
    again = run_plain(tiny(**{"runtime.inject_failure_epoch": 1}), tmp_path / "cut.pt", log=lines.append)
    assert lines[0].startswith("continuing from") and "epoch 2" in lines[0] and len(lines) == 2
    assert re.fullmatch(r"epoch 3/3 loss .* img/s, \d+ s, 0 s left", lines[1])  # the last epoch leaves nothing
    assert json.loads(again.metrics["checkpoint_report"])["epoch"] == 1  # the first report after the restore
    assert again.metrics["epoch"] == 2 and again.metrics["param_checksum"] == pytest.approx(
        whole.metrics["param_checksum"], rel=1e-9)
    assert again.metrics["acc"] == whole.metrics["acc"] and again.best_metrics["acc"] == whole.best_metrics["acc"]
    done = run_plain(tiny(), tmp_path / "cut.pt", log=lambda _: None)  # finished: nothing left to train
    assert done.metrics["param_checksum"] == again.metrics["param_checksum"]
    assert load_checkpoint(tmp_path / "cut.pt")["legs"] == load_checkpoint(tmp_path / "whole.pt")["legs"] == [
        {"first": 1, "last": 3, "device": precision_label(device_options(torch.device("cpu"), True, True))}]


def test_legs_say_which_epochs_ran_where():
    cpu, gpu = "cpu (AVX2), fp32", "cuda (NVIDIA H200), bf16"
    legs = add_leg([], 1, 5, gpu)
    assert add_leg(legs, 6, 9, gpu) == [{"first": 1, "last": 9, "device": gpu}]  # resumed on the same machine
    assert add_leg(legs, 6, 9, cpu) == [{"first": 1, "last": 5, "device": gpu}, {"first": 6, "last": 9, "device": cpu}]
    assert add_leg(legs, 8, 9, gpu)[-1] == {"first": 8, "last": 9, "device": gpu}  # a gap is not hidden


def test_a_checkpoint_from_before_legs_says_its_epochs_are_not_recorded(tmp_path):
    run_plain(tiny(**{"optim.epochs": 2}), tmp_path / "old.pt", log=lambda _: None)
    state = load_checkpoint(tmp_path / "old.pt")
    del state["legs"]
    save_checkpoint(state, tmp_path / "old.pt")
    run_plain(tiny(), tmp_path / "old.pt", log=lambda _: None)  # epoch 3 of 3 here
    here = precision_label(device_options(torch.device("cpu"), True, True))
    assert load_checkpoint(tmp_path / "old.pt")["legs"] == [{"first": 1, "last": 2, "device": "not recorded"},
                                                             {"first": 3, "last": 3, "device": here}]


def test_plain_grid_writes_report_state_and_analyses(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    seen = []  # the report as each cell starts: a grid killed mid-cell has the cells before it in its report
    real = run.train_cell
    report_path = out / "reproduction-digits-lt-1ep.md"
    monkeypatch.setattr(run, "train_cell", lambda *a, **k: (seen.append(
        report_path.read_text() if report_path.is_file() else ""), real(*a, **k))[1])
    code = reproduce_main(["--dataset", "digits-lt", "--methods", "bsce,mbib", "--ifs", "10", "--epochs", "1",
                           "--runner", "plain", "--out", str(out), "--set", "data.limit_train=64",
                           "--set", "data.limit_test=40", "--set", "optim.batch_size=32"])
    assert code == 0
    state = json.loads((out / "reproduction-digits-lt-1ep.state.json").read_text())
    mbib = state["cells"]["grid/mbib/IF10"]
    assert mbib["runner"] == "plain" and "mlflow" not in state and mbib["wall_s"] > 0
    assert set(mbib["analysis"]["heads"]) == {"v1", "v2", "v3", "z", "f+g"}
    assert mbib["analysis"]["heads"]["f+g"]["acc"] == pytest.approx(mbib["final"]["overall"], abs=2.51)
    report = (out / "reproduction-digits-lt-1ep.md").read_text()
    assert "| bsce | 10 |" in report and "grid/mbib/IF10" in report and "Still to run" not in report
    here = precision_label(device_options(torch.device("cpu"), True, True))
    assert f"- `grid/mbib/IF10`: 1-1 {here}\n" in report and f"- `grid/bsce/IF10`: 1-1 {here}\n" in report
    assert seen[0] == "" and "| bsce | 10 | not run yet" not in seen[1] and "| mbib | 10 | not run yet" in seen[1]

    # --report-only: a cell still running (its kept checkpoint, here a copy of mbib's) shows its last evaluation
    cells = out / "cells" / "reproduction-digits-lt-1ep"
    (cells / "grid-ce-IF10-seed0.pt").write_bytes((cells / "grid-mbib-IF10-seed0.pt").read_bytes())
    args = ["--dataset", "digits-lt", "--methods", "bsce,mbib,ce", "--ifs", "10", "--epochs", "1", "--runner", "plain",
            "--out", str(out), "--set", "data.limit_train=64", "--set", "data.limit_test=40", "--set",
            "optim.batch_size=32", "--report-only"]
    assert reproduce_main(args) == 0
    report = (out / "reproduction-digits-lt-1ep.md").read_text()
    assert f"grid/ce/IF10 (1 of 1 epochs done; at epoch 1: overall {mbib['final']['overall']:.1f}" in report
    assert json.loads((out / "reproduction-digits-lt-1ep.state.json").read_text()) == state  # trained and noted nothing


def test_processes_sharing_a_state_keep_each_others_cells(tmp_path):
    """Each save merges into the file: a process never drops or rolls back a cell another process wrote."""
    a, b = State(tmp_path / "s.json", {"k": 1}), State(tmp_path / "s.json", {"k": 1})
    a.cells["x"] = {"final": 1}
    a.save()
    b.cells["y"] = {"final": 2}
    b.save()  # b never saw x
    assert set(json.loads((tmp_path / "s.json").read_text())["cells"]) == {"x", "y"}
    b.refresh()
    a.cells["x"]["analysis"] = {"rho": 3}  # a completes its record after b took in the bare one
    a.save()
    b.save()
    assert json.loads((tmp_path / "s.json").read_text())["cells"]["x"] == {"final": 1, "analysis": {"rho": 3}}


def test_a_cell_claim_is_held_by_one_holder_at_a_time(tmp_path):
    ckpt = tmp_path / "cells" / "c.pt"
    with cell_claim(ckpt) as first:
        with cell_claim(ckpt) as second:
            assert first and not second
    with cell_claim(ckpt) as again:
        assert again  # released when its holder ends


def test_jobs_train_every_cell_once_and_report_them(tmp_path, capfd):
    out, barrier = tmp_path / "out", tmp_path / "barrier"
    barrier.mkdir()
    args = ["--dataset", "digits-lt", "--methods", "ce,bsce,bib", "--ifs", "10", "--epochs", "1", "--runner", "plain",
            "--out", str(out), "--set", "data.limit_train=64", "--set", "data.limit_test=40",
            "--set", "optim.batch_size=32", "--jobs", "2"]
    # each job holds its first cell until both do: two processes train at once and save into one state file
    assert reproduce_main([*args, "--claim-barrier", f"{barrier}:2"]) == 0
    printed = capfd.readouterr().out
    assert printed.count(": training ") == 3 and printed.count("IF10: done in") == 3
    assert len(set(re.findall(r"\(process (\d+)\)", printed))) == 2 == len(list(barrier.iterdir()))
    assert "[1/3] grid/ce/IF10: another process is training it, skipped" in printed
    state = json.loads((out / "reproduction-digits-lt-1ep.state.json").read_text())
    assert set(state["cells"]) == {"grid/ce/IF10", "grid/bsce/IF10", "grid/bib/IF10"}
    assert all("analysis" in c for c in state["cells"].values())
    assert len(state["commands"]) == 1 and "--jobs 2" in state["commands"][0]  # the jobs note no command of their own
    report = (out / "reproduction-digits-lt-1ep.md").read_text()
    assert "Still to run" not in report and "| bib | 10 |" in report
    assert reproduce_main([*args, "--runner", "ray"]) == 2  # several jobs need the plain runner: one line
    assert "more than one job needs --runner plain" in capfd.readouterr().err
