"""bench/investigation.py: runs pooled across their folders, seeds as mean and spread, margins paired by seed."""

import json
import re

import pytest

from mbib.checkpoint import save_checkpoint
from mbib.reproduction import investigation as inv
from mbib.reproduction.grid import base_config, cell_config
from mbib.reproduction.state import State


def fake_cell(overall: float, z_rho: float | None = None) -> dict:
    return {"final": {"overall": overall, "many": overall + 10, "medium": overall, "few": overall - 10},
            "best_epoch": 200, "epochs": 200,
            "analysis": {"rho": {"z": {"all": z_rho}} if z_rho else {}, "posterior": [0.25, 0.35],
                         "heads": {"v1": {"acc": 11.0}, "f+g": {"acc": overall, "share": {"many": 40.0}}}}}


def write_state(root, run, cells):
    plan = inv.run_plan(run, "cifar100-lt", 200)
    state = State(root / run.folder / f"{plan.tag}.state.json", plan.settings())
    for method, record in cells.items():
        state.cells[inv.cell_key(method)] = record
    state.save()


def test_report_pools_seeds_and_pairs_margins_by_seed(tmp_path):
    runs = {r.name: r for r in inv.RUNS}
    write_state(tmp_path, runs["seed 0"], {"mbib": fake_cell(41.0, 1.3), "bsce": fake_cell(40.0, 1.4)})
    write_state(tmp_path, runs["seed 1"], {"mbib": fake_cell(43.0, 1.1), "bsce": fake_cell(40.0, 1.4)})
    legs = [{"first": 1, "last": 105, "device": "cpu (AVX512), bf16"}, {"first": 106, "last": 200, "device": "cpu (AVX2), fp32"}]
    write_state(tmp_path, runs["seed 2"], {"mbib": {**fake_cell(45.0), "legs": legs}})  # no BSCE yet: no pair for seed 2
    write_state(tmp_path, runs["Table 9: neither"], {"mbib": fake_cell(30.0)})
    report = inv.write_report(tmp_path, inv.RUNS, "cifar100-lt", 200, "python bench/investigation.py").read_text()
    assert "MBIB − BSCE: seed 0: +1.0, seed 1: +3.0; mean 2.0 ± 1.4 (n=2) (paper +4.8)" in report
    assert "| mbib | paper defaults | 0,1,2 | 43.0 ± 2.0 (n=3) | 53.0 ± 2.0 (n=3) |" in report
    assert "| 1.20 ± 0.14 (n=2) |" in report  # rho of z over the two seeds that have it
    # the Table 9 row carries its published splits; its settings are named
    assert "| mbib | logit_adjust=false, m=0 | 0 | 30.0 (n=1) |" in report and "43.5/62.4/44.6/20.1" in report
    assert "| 200/200 | 1-105 cpu (AVX512), bf16; 106-200 cpu (AVX2), fp32 |" in report  # where each epoch ran
    assert "| 200/200 | not recorded |" in report  # a record from before legs were kept
    assert "- seed 2 (seeds): bsce (not begun) in `investigation/seed2/`" in report
    assert "- seed 2: BIB (seeds): bib (not begun) in `investigation/seed2-bib/`" in report
    # hand-written verdicts survive a rewrite
    path = tmp_path / "investigation-cifar100-lt-200ep.md"
    path.write_text(report.replace(inv.NOTES_START + "\n(none yet)", inv.NOTES_START + "\nseeds: undecided"))
    assert "seeds: undecided" in inv.write_report(tmp_path, inv.RUNS, "cifar100-lt", 200, "x").read_text()


def test_still_to_run_says_how_far_each_kept_checkpoint_got(tmp_path):
    runs = {r.name: r for r in inv.RUNS}
    beta2, teachers = runs["beta 2"], runs["undetached shallow teachers"]
    plan = inv.run_plan(beta2, "cifar100-lt", 200)
    path = inv.carry_path(tmp_path / beta2.folder, plan, inv.grid_cell("mbib", inv.IMBALANCE_FACTOR))
    path.parent.mkdir(parents=True)
    legs = [{"first": 1, "last": 10, "device": "cpu (AVX512), bf16"}, {"first": 11, "last": 75, "device": "cpu (AVX2), fp32"}]
    save_checkpoint({"model": {}, "model_spec": {}, "epoch": 74, "elapsed_s": 5.5 * 3600, "legs": legs}, path)
    broken = inv.carry_path(tmp_path / teachers.folder, inv.run_plan(teachers, "cifar100-lt", 200),
                            inv.grid_cell("mbib", inv.IMBALANCE_FACTOR))
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"half a file")
    lines = inv.pending(tmp_path, [beta2, teachers, runs["seed 2: BIB"]], "cifar100-lt", 200, None)
    assert lines[0] == ("- beta 2 (beta): mbib (epoch 75/200, 5.5 h trained: 1-10 cpu (AVX512), bf16; 11-75 cpu "
                        "(AVX2), fp32) in `investigation/mbib-beta2/`")
    assert lines[1].startswith("- undetached shallow teachers (teachers): mbib (checkpoint unreadable (checkpoint ")
    assert lines[2] == "- seed 2: BIB (seeds): bib (not begun) in `investigation/seed2-bib/`"


def test_mean_sd_is_the_sample_spread():
    assert inv.mean_sd([40.0, 42.0]) == "41.0 ± 1.4 (n=2)"
    assert inv.mean_sd([None, 40.0]) == "40.0 (n=1)" and inv.mean_sd([]) == "—"


def test_runs_are_named_resumable_grids_in_their_own_folders():
    folders = [r.folder for r in inv.RUNS]
    assert len(set(folders)) == len(folders) and len({r.name for r in inv.RUNS}) == len(inv.RUNS)
    args = inv.reproduce_args(inv.Path("r"), {r.name: r for r in inv.RUNS}["Table 9: neither"], "cifar100-lt", 200)
    assert args[args.index("--out") + 1] == "r/investigation/mbib-no-rebalancing"
    assert "loss.m=0" in args and "loss.logit_adjust=false" in args and "--runner" in args


def test_issue_35_cells_come_in_its_order_before_the_queue_left_and_resolve_to_their_recipes():
    names = [r.name for r in inv.RUNS]
    order = ["CE at Cao et al.'s recipe", "CE on q50", "CE on chroma", "BSCE on q50", "GLMC optimiser"]
    first = names.index(order[0])
    assert names[first:first + len(order)] == order
    assert names.index("seed 1: BIB") > first and names.index("Table 9: m = 0") > first  # the queue that was there
    runs = {r.name: r for r in inv.RUNS}

    def config(name, method):
        plan = inv.run_plan(runs[name], "cifar100-lt", 200)
        return cell_config(plan, base_config(plan), inv.grid_cell(method, inv.IMBALANCE_FACTOR))

    cao = config(order[0], "ce")
    assert (cao.optim.weight_decay, cao.runtime.eval_every, cao.runtime.seed) == (2e-4, 1, 0)
    assert (cao.data.imbalance_factor, cao.optim.epochs, cao.data.recompress) == (100, 200, "none")
    assert [config(n, m).data.recompress for n, m in (("CE on q50", "ce"), ("CE on chroma", "ce"),
                                                       ("BSCE on q50", "bsce"))] == ["q50", "chroma", "q50"]
    assert runs["GLMC optimiser"].methods == ("mbib", "bsce")
    glmc = config("GLMC optimiser", "mbib").optim
    assert (glmc.lr, glmc.batch_size, glmc.weight_decay, glmc.schedule, glmc.warmup_epochs) == \
        (0.01, 64, 5e-3, "cosine", 10)
    assert config("GLMC optimiser", "mbib").loss.vsd_warmup_epochs == 5  # MBIB's VSD ramp as in its other cells
    args = inv.reproduce_args(inv.Path("r"), runs[order[0]], "cifar100-lt", 200)
    assert "optim.weight_decay=2e-4" in args and "runtime.eval_every=1" in args


def test_every_cell_shows_best_on_test_beside_last_labelled(tmp_path):
    run = {r.name: r for r in inv.RUNS}["CE at Cao et al.'s recipe"]
    write_state(tmp_path, run, {"ce": {**fake_cell(35.2), "best": {"overall": 36.4}, "best_epoch": 187}})
    report = inv.write_report(tmp_path, inv.RUNS, "cifar100-lt", 200, "x").read_text()
    assert "| few | best-on-test overall |" in report and "not a result" in report
    assert "| 35.2 | 45.2 | 35.2 | 25.2 | 36.4 |" in report and "| 187/200 |" in report


@pytest.mark.slow
def test_jobs_train_one_cell_runs_side_by_side_then_the_starter_analyses_and_skips_them(tmp_path, capfd):
    argv = ["--root", str(tmp_path), "--dataset", "digits-lt", "--epochs", "1", "--runs", "beta 2,teachers",
            "--set", "data.limit_train=64", "--set", "data.limit_test=40", "--set", "optim.batch_size=32",
            "--set", "runtime.show_progress=false"]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # two runs of one cell each: with --jobs 2 each job holds a cell until both do, so they train at once
    assert inv.main([*argv, "--jobs", "2", "--claim-barrier", f"{barrier}:2"]) == 0
    printed = capfd.readouterr().out
    assert printed.count(": training mbib") == 2 and len(list(barrier.iterdir())) == 2
    assert len(set(re.findall(r"\(process (\d+)\)", printed))) == 2
    assert "[1/1] grid/mbib/IF100: another process is training it, skipped" in printed
    report = (tmp_path / "investigation-digits-lt-1ep.md").read_text()
    assert "| mbib | beta=2 | 0 |" in report and "| mbib | detach_shallow=false | 0 |" in report
    for folder in ("mbib-undetached", "mbib-beta2"):  # the starter analysed what the jobs trained
        state = json.loads((tmp_path / f"investigation/{folder}/reproduction-digits-lt-1ep.state.json").read_text())
        assert "analysis" in state["cells"]["grid/mbib/IF100"]
    assert state["settings"]["overrides"]["loss.beta"] == "2"
    assert inv.main(argv) == 0 and ": training" not in capfd.readouterr().out  # finished runs are skipped
    assert inv.main([*argv[:6], "--runs", "nonsense"]) == 2
