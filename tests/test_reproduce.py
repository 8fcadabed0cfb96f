"""bench/reproduce.py end to end on a tiny digits-lt grid: every requested cell reported, reruns skip them."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mbib.errors import ConfigError
from mbib.reproduction import grid
from mbib.reproduction.report import NOTES_START, loss_line, write_report
from mbib.reproduction.state import State, device_label, machine_info
from mbib.train.engine import cpu_has_native_bf16, device_options, precision_label

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "reproduce.py"
METHODS, IFS = ("ce", "bib"), ("10",)  # one IF keeps the suite short; the grid code loops the same way


def run_script(tmp_path, monkeypatch, *extra):
    argv = ["--dataset", "digits-lt", "--methods", ",".join(METHODS), "--ifs", ",".join(IFS), "--epochs", "1",
            "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", "data.limit_train=64", "--set", "data.limit_test=40", "--set", "optim.batch_size=32",
            "--set", "runtime.show_progress=false", "--set", f"runtime.storage_path={tmp_path / 'runs'}", *extra]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return done.value.code


def table_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """Rows of the Table 1 section keyed by (method, IF)."""
    section = report.split("## Table 1")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("Method",):
            rows[(cells[0], cells[1])] = cells
    return rows


@pytest.mark.slow
def test_grid_report_holds_every_cell_and_rerun_skips_them(ray_local, tmp_path, monkeypatch, capsys):
    assert run_script(tmp_path, monkeypatch) == 0
    report_path = tmp_path / "out" / "reproduction-digits-lt-1ep.md"
    state_path = tmp_path / "out" / "reproduction-digits-lt-1ep.state.json"
    report = report_path.read_text()
    rows = table_rows(report)
    assert set(rows) == {(m, f) for m in METHODS for f in IFS}
    state = json.loads(state_path.read_text())
    for (m, f), cells in rows.items():
        overall = float(cells[2])  # a number, not "not run yet"
        assert 0.0 <= overall <= 100.0
        assert cells[6] == "n/a" and cells[7] == "n/a"  # the paper has no digits-lt numbers
        rec = state["cells"][f"grid/{m}/IF{f}"]
        assert rec["final"]["overall"] == pytest.approx(overall, abs=0.051) and rec["epochs"] == 1
    assert "Machine:" in report and "--epochs 200" in report  # machine line and the CIFAR-100-LT command
    # 64 training images over 10 classes: every class is few-shot (< 20), so the few column has numbers
    assert re.search(r"Few-shot accuracy: CE [\d.]+, BIB [\d.]+", report)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reproduction")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["mlflow"]["parent_run_id"]]
    assert len(children) == 2 and len(runs) == 3

    # notes written by hand survive regeneration; a rerun trains nothing
    report_path.write_text(report.replace(NOTES_START + "\n", NOTES_START + "\nmy notes\n"))
    capsys.readouterr()
    assert run_script(tmp_path, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 2 and "training" not in printed
    assert json.loads(state_path.read_text())["cells"] == state["cells"]
    assert len(client.search_runs([exp.experiment_id])) == 3
    assert "my notes" in report_path.read_text()

    # each cell was analysed when it ended, from its final checkpoint kept beside the state
    bib, ce = state["cells"]["grid/bib/IF10"]["analysis"], state["cells"]["grid/ce/IF10"]["analysis"]
    assert set(bib["rho"]) == {"v", "z"} and 0 < bib["rho"]["z"]["all"] < 10 and set(ce["rho"]) == {"v"}
    assert len(ce["posterior"]) == 10 and all(0.0 <= p <= 1.0 for p in ce["posterior"])
    assert set(bib["heads"]) == {"v3", "z", "f+g"}  # BIB: the final tap and z
    # the mean head is the prediction the training run evaluated (within one of 40 test images: the engine may
    # evaluate under bf16 autocast on CPUs with native bf16)
    assert bib["heads"]["f+g"]["acc"] == pytest.approx(state["cells"]["grid/bib/IF10"]["final"]["overall"], abs=2.51)
    assert sum(bib["heads"]["z"]["share"].values()) == pytest.approx(100.0)  # every prediction in one group
    assert (tmp_path / "out" / "cells" / "reproduction-digits-lt-1ep" / "grid-bib-IF10-seed0.pt").is_file()
    assert "| grid/bib/IF10 | v3 " in report


def test_changed_settings_refuse_to_mix_with_a_finished_grid(tmp_path):
    plan = grid.Plan("digits-lt", 1, 0, ("ce",), (10.0,), {})
    State(tmp_path / "s.json", plan.settings()).save()
    other = grid.Plan("digits-lt", 2, 0, ("ce",), (10.0,), {})
    with pytest.raises(ConfigError, match="other settings"):
        State(tmp_path / "s.json", other.settings())


def test_plan_reuses_grid_cells_and_names_files():
    plan = grid.Plan("cifar100-lt", 200, 0, ("bib", "mbib"), (100.0,), {}, rho=True, beta_ablation=True,
                          taps_ablation=True)
    keys = [c.key for c in grid.plan_cells(plan)]
    assert len(keys) == len(set(keys))
    # beta = 5 is the default, so Figure 3's beta-5 points are the grid cells; rho adds BSCE at IF 100
    assert "beta/bib/beta5" not in keys and "grid/bsce/IF100" in keys
    assert len(keys) == 2 + 1 + 2 * 5 + 6  # Table 4: 2..6 taps and 4-MBIB(x)
    assert plan.tag == "reproduction-cifar100-lt-200ep"
    assert grid.Plan("npz:/d/my set.npz", 8, 0, ("ce",), (10.0,), {}).tag == "reproduction-my_set-8ep"
    base = grid.base_config(grid.Plan("mnist-lt", 20, 0, ("ce",), (10.0,), {}))
    assert base.optim.milestones == (16, 18) and base.optim.warmup_epochs == pytest.approx(0.5)
    assert base.loss.drw_epoch == 16  # LDAM-DRW re-weights from the first lr drop, scaled like it
    two = dict(grid.taps_cell(2).overrides)
    assert two["loss.a"] == 0.0 and two["model.num_taps"] == 2
    assert dict(grid.taps_cell(4).overrides)["loss.a"] == 0.3
    with_x = grid.cell_config(plan, grid.base_config(plan), grid.taps_cell("4x"))
    assert with_x.model.input_tap and with_x.model.num_taps == 3 and with_x.loss.a == 0.3


def test_report_names_each_methods_loss_settings():
    """BSCE trains without Eq. 7 weights (Ren et al.), MBIB with Sec. 4.2's; a --set value reaches both."""
    plan = grid.Plan("cifar100-lt", 200, 0, ("bsce", "mbib", "ce"), (100.0,), {})
    line = loss_line(plan, grid.base_config(plan))
    assert line.startswith("bsce m 0, weighted_mean weights; mbib beta 5, a 0.1, b 0.3, m 0.1, gamma 0,")
    assert line.endswith("; ce none")
    plan = grid.Plan("cifar100-lt", 200, 0, ("bsce", "mbib"), (100.0,), {"loss.m": "0.2"})
    assert loss_line(plan, grid.base_config(plan)).count("m 0.2") == 2


def test_report_lists_the_settings_that_decide_the_numbers_not_how_a_machine_ran_them(tmp_path):
    plan = grid.Plan("cifar100-lt", 200, 0, ("mbib",), (100.0,),
                     {"loss.beta": "2", "runtime.cpus_per_worker": "1", "runtime.show_progress": "false"})
    path = write_report(plan, State(tmp_path / "s.json", plan.settings()), tmp_path / "r.md")
    assert "- Extra settings (`--set`): `loss.beta=2`. GML rows" in path.read_text()


def _cell_legs(tmp_path, runner: str, interrupt: bool, doctor=None):
    """One bsce cell of a 3-epoch digits grid, run through `run_cells` in one leg or in two: the first dies after
    epoch 1's checkpoint, the second continues it from the kept checkpoint elsewhere (another storage path, as on
    another machine). `doctor(carry)` may edit the checkpoint between the legs."""
    from mbib.reproduction.run import run_cells

    out = tmp_path / f"{runner}-{'cut' if interrupt else 'whole'}"
    sets = {"data.limit_train": "96", "data.limit_test": "40", "optim.batch_size": "32", "optim.lr": "0.02",
            "runtime.eval_every": "1",
            "runtime.show_progress": "false", "runtime.cpus_per_worker": "1"}
    uri = f"sqlite:///{out / 'mlflow.db'}" if runner == "ray" else None
    legs = [{"runtime.inject_failure_epoch": "1", "runtime.storage_path": str(out / "leg1")}] if interrupt else []
    legs.append({"runtime.storage_path": str(out / "leg2")})
    for i, leg in enumerate(legs):
        plan = grid.Plan("digits-lt", 3, 0, ("bsce",), (10.0,), {**sets, **leg}, runner=runner)
        state = State(out / "state.json", plan.settings())
        cell = grid.plan_cells(plan)
        if i + 1 < len(legs):
            with pytest.raises(Exception, match="injected fault"):
                run_cells(plan, state, cell, uri)
            if doctor:
                doctor(grid.carry_path(out, plan, cell[0]))
        else:
            run_cells(plan, state, cell, uri)
    from mbib.checkpoint import load_checkpoint

    return state.cells["grid/bsce/IF10"], load_checkpoint(grid.carry_path(out, plan, cell[0]))["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _cell_legs(tmp_path_factory.mktemp("whole"), "plain", interrupt=False)


ELSEWHERE = [{"first": 1, "last": 2, "device": "cuda (NVIDIA H200), bf16"}]


def first_leg_elsewhere(carry):
    """An earlier leg's best that the second leg cannot beat (a runner that keeps only its own leg's best loses
    it), trained on another machine (the record must say which epochs ran where)."""
    from mbib.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(carry)
    state["best_metrics"] = {**state["best_metrics"], "acc": 99.5, "epoch": 0}
    state["best_acc"] = 99.5
    state["legs"] = ELSEWHERE
    save_checkpoint(state, carry)


def here() -> str:
    """This machine's device and precision as the engine trains by default."""
    return precision_label(device_options(torch.device("cpu"), amp=True, channels_last=True))


@pytest.mark.slow
def test_a_plain_cell_interrupted_once_equals_an_uninterrupted_one(uninterrupted, tmp_path):
    import torch

    whole, whole_weights = uninterrupted
    cut, cut_weights = _cell_legs(tmp_path, "plain", interrupt=True)
    for key in ("final", "best", "best_epoch", "epochs"):  # as JSON: a shot group without classes is NaN in both
        assert json.dumps(cut[key]) == json.dumps(whole[key]), key
    assert all(torch.equal(cut_weights[k], whole_weights[k]) for k in whole_weights)
    # one machine's two legs are one: epochs 1-3 here
    assert cut["legs"] == whole["legs"] == [{"first": 1, "last": 3, "device": here()}]
    doctored, _ = _cell_legs(tmp_path / "doctored", "plain", interrupt=True, doctor=first_leg_elsewhere)
    assert doctored["best"]["overall"] == 99.5 and doctored["best_epoch"] == 1
    assert doctored["legs"] == [*ELSEWHERE, {"first": 3, "last": 3, "device": here()}]


@pytest.mark.slow
def test_a_ray_cell_continued_elsewhere_keeps_the_best_of_every_leg(uninterrupted, ray_local, tmp_path):
    """The Ray runner's second leg (another storage path: another machine) ends where the uninterrupted run does
    (same engine, seed and one thread, so the plain run is the reference) and keeps the first leg's best."""
    import torch

    whole, whole_weights = uninterrupted
    cut, cut_weights = _cell_legs(tmp_path, "ray", interrupt=True, doctor=first_leg_elsewhere)
    assert json.dumps(cut["final"]) == json.dumps(whole["final"]) and cut["epochs"] == whole["epochs"]
    assert all(torch.equal(cut_weights[k], whole_weights[k]) for k in whole_weights)
    assert cut["best"]["overall"] == 99.5 and cut["best_epoch"] == 1
    assert cut["legs"] == [*ELSEWHERE, {"first": 3, "last": 3, "device": here()}]


def test_the_machine_line_says_which_precision_a_cpu_trains_in():
    assert device_label(None, "AVX2", False) == "cpu (AVX2, no native bf16: trains in fp32)"
    assert device_label(None, "AVX512", True) == "cpu (AVX512, native bf16: trains in bf16)"
    assert device_label("NVIDIA H200", "AVX512", False) == "cuda (NVIDIA H200)"
    if not torch.cuda.is_available():  # this machine's own line agrees with the engine's precision rule
        assert machine_info()["device"] == device_label(None, torch.backends.cpu.get_cpu_capability(),
                                                        cpu_has_native_bf16())
