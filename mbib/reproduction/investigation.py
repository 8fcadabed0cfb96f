"""The CIFAR-100-LT investigation: which lead separates our MBIB from the paper's, and is MBIB's margin over
BSCE real. One named grid of reproduction runs (each its own resumable `bench/reproduce.py` state, most valuable
first) and one report that pools them: per cell its accuracies, heads, rho (Table 5) and posterior (Appendix D);
per setting the seeds as mean and spread; MBIB - BSCE paired by seed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mbib.reproduction.grid import Plan, carry_path, grid_cell, if_label
from mbib.reproduction.report import (NOTES_END, NOTES_START, PAPER_TABLE1, fmt, legs_text, md_table,
                                     previous_notes)
from mbib.reproduction.state import State

IMBALANCE_FACTOR = 100.0
# Table 9 (MBIB's re-balancing ablation, CIFAR-100-LT IF 100): overall, many, medium, few
PAPER_TABLE9 = {(): (47.0, 64.1, 47.7, 26.1), (("loss.m", "0"),): (46.1, 65.0, 46.6, 23.5),
                (("loss.logit_adjust", "false"),): (44.8, 63.0, 45.8, 22.3),
                (("loss.logit_adjust", "false"), ("loss.m", "0")): (43.5, 62.4, 44.6, 20.1)}


@dataclass(frozen=True)
class Run:
    """One reproduction run of the investigation: methods at one seed with the same settings, in `folder`."""

    name: str
    folder: str  # under the results root; an existing grid's folder reuses its finished cells
    seed: int
    methods: tuple[str, ...]
    sets: tuple[tuple[str, str], ...] = ()  # sorted (key, value) --set pairs
    lead: str = ""


def _run(name: str, folder: str, methods: Sequence[str], sets: dict[str, str] | None = None, seed: int = 0,
         lead: str = "") -> Run:
    return Run(name, folder, seed, tuple(methods), tuple(sorted((sets or {}).items())), lead)


# GLMC's CIFAR defaults (CVPR 2023 code): SGD lr 0.01, batch 64, weight decay 5e-3, cosine after 10 warm-up epochs
GLMC_OPTIM = {"optim.lr": "0.01", "optim.batch_size": "64", "optim.weight_decay": "5e-3", "optim.schedule": "cosine",
              "optim.warmup_epochs": "10", "loss.vsd_warmup_epochs": "5"}

# most valuable first: the done-when set (seeds of the closest pair, beta 2, the shallow teachers), then
# BIB's seeds, the other betas, Table 9, the neck; `--jobs N` trains the first N free cells side by side
RUNS = (
    _run("seed 0", "h200", ("bsce", "bib", "mbib"), lead="seeds"),  # the H200 grid's cells (bf16, torch 2.11)
    _run("seed 1", "seed1", ("mbib", "bsce"), seed=1, lead="seeds"),  # begun on the H200, continued on CPUs
    # BSCE first: half MBIB's time on a CPU, so a session's end more often finds a finished cell
    _run("seed 2", "investigation/seed2", ("bsce", "mbib"), seed=2, lead="seeds"),
    _run("beta 2", "investigation/mbib-beta2", ("mbib",), {"loss.beta": "2"}, lead="beta"),
    _run("undetached shallow teachers", "investigation/mbib-undetached", ("mbib",),
         {"loss.detach_shallow": "false"}, lead="teachers"),
    # issue 35, where the ~3 points below the published numbers go, in its order: the recipe (Cao et al.'s weight
    # decay, evaluated every epoch: best-on-test beside last), the data (one more JPEG or chroma dose of every
    # image, mbib.data.recompress), then GLMC's optimiser recipe (whose label_weighting code Appendix J shares)
    _run("CE at Cao et al.'s recipe", "investigation/ce-cao-recipe", ("ce",),
         {"optim.weight_decay": "2e-4", "runtime.eval_every": "1"}, lead="recipe"),
    _run("CE on q50", "investigation/ce-q50", ("ce",), {"data.recompress": "q50"}, lead="data"),
    _run("CE on chroma", "investigation/ce-chroma", ("ce",), {"data.recompress": "chroma"}, lead="data"),
    _run("BSCE on q50", "investigation/bsce-q50", ("bsce",), {"data.recompress": "q50"}, lead="data"),
    # the VSD ramp stays 5 epochs (it follows the lr warm-up unless set), so only the optimiser changes
    _run("GLMC optimiser", "investigation/glmc-optim", ("mbib", "bsce"), GLMC_OPTIM, lead="glmc"),
    _run("seed 1: BIB", "investigation/seed1-bib", ("bib",), seed=1, lead="seeds"),
    _run("seed 2: BIB", "investigation/seed2-bib", ("bib",), seed=2, lead="seeds"),
    _run("beta 1", "investigation/mbib-beta1", ("mbib",), {"loss.beta": "1"}, lead="beta"),
    _run("beta 3", "investigation/mbib-beta3", ("mbib",), {"loss.beta": "3"}, lead="beta"),
    _run("Table 9: m = 0", "investigation/mbib-m0", ("mbib",), {"loss.m": "0"}, lead="table9"),
    _run("Table 9: no logit adjustment", "investigation/mbib-no-la", ("mbib",), {"loss.logit_adjust": "false"},
         lead="table9"),
    _run("Table 9: neither", "investigation/mbib-no-rebalancing", ("mbib",),
         {"loss.m": "0", "loss.logit_adjust": "false"}, lead="table9"),
    _run("neck bn-post", "investigation/mbib-neck-bn-post", ("mbib",), {"model.neck": "bn-post"}, lead="neck"),
    _run("neck bn", "investigation/neck-bn", ("mbib", "bsce"), {"model.neck": "bn"}, lead="neck"),
)


def run_plan(run: Run, dataset: str, epochs: int, extra: dict[str, str] | None = None) -> Plan:
    return Plan(dataset, epochs, run.seed, run.methods, (IMBALANCE_FACTOR,), {**dict(run.sets), **(extra or {})},
                runner="plain")


def run_state(root: Path, run: Run, plan: Plan) -> State | None:
    """The run's reproduction state, or None before it has one."""
    path = root / run.folder / f"{plan.tag}.state.json"
    return State(path, plan.settings()) if path.is_file() else None


def cell_key(method: str) -> str:
    return f"grid/{method}/{if_label(IMBALANCE_FACTOR)}"


def reproduce_args(root: Path, run: Run, dataset: str, epochs: int, extra: dict[str, str] | None = None) -> list[str]:
    """The `bench/reproduce.py` arguments that train (or continue) `run`."""
    sets = [a for k, v in (*run.sets, *(extra or {}).items()) for a in ("--set", f"{k}={v}")]
    return ["--dataset", dataset, "--epochs", str(epochs), "--methods", ",".join(run.methods),
            "--ifs", f"{IMBALANCE_FACTOR:g}", "--seed", str(run.seed), "--runner", "plain",
            "--out", str(root / run.folder), *sets]


def collect(root: Path, runs: Sequence[Run], dataset: str, epochs: int,
            extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every finished cell of the runs: its run, method, seed, settings and record."""
    rows = []
    for run in runs:
        state = run_state(root, run, run_plan(run, dataset, epochs, extra))
        for method in run.methods:
            record = state.cells.get(cell_key(method)) if state else None
            if record:
                rows.append({"run": run, "method": method, "seed": run.seed, "sets": run.sets, "record": record})
    return rows


def mean_sd(values: Sequence[float | None], digits: int = 1) -> str:
    """`mean ± sd (n)` with the sample standard deviation; one value alone has no spread."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def _rho(record: dict[str, Any], key: str) -> float | None:
    return record.get("analysis", {}).get("rho", {}).get(key, {}).get("all")


def _posterior(record: dict[str, Any]) -> float | None:
    posterior = record.get("analysis", {}).get("posterior")
    return statistics.mean(posterior) if posterior else None


def _head(record: dict[str, Any], head: str) -> float | None:
    return record.get("analysis", {}).get("heads", {}).get(head, {}).get("acc")


def _many_share(record: dict[str, Any]) -> float | None:
    return record.get("analysis", {}).get("heads", {}).get("f+g", {}).get("share", {}).get("many")


def sets_label(sets: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sets) or "paper defaults"


def setting_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row per (method, settings): the seeds pooled as mean ± sd."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["sets"]), []).append(row)
    out = []
    for (method, sets), group in groups.items():
        recs = [g["record"] for g in group]
        paper = PAPER_TABLE9.get(sets) if method == "mbib" else None
        paper_text = "/".join(f"{v:.1f}" for v in paper) if paper else fmt(None if sets else PAPER_TABLE1.get(method, {}).get(IMBALANCE_FACTOR))
        out.append([method, sets_label(sets), ",".join(str(g["seed"]) for g in group),
                    *(mean_sd([r["final"][k] for r in recs]) for k in ("overall", "many", "medium", "few")),
                    mean_sd([_head(r, "v1") for r in recs]), mean_sd([_rho(r, "z") for r in recs], 2),
                    mean_sd([_posterior(r) for r in recs], 3), paper_text])
    return out


def margin_lines(rows: list[dict[str, Any]]) -> list[str]:
    """MBIB - BSCE and MBIB - BIB at the paper's settings, paired by seed (the same long-tail subset)."""
    default = {(r["method"], r["seed"]): r["record"]["final"]["overall"] for r in rows if not r["sets"]}
    lines = []
    for other, paper in (("bsce", 4.8), ("bib", 2.6)):
        seeds = sorted(s for m, s in default if m == "mbib" and (other, s) in default)
        diffs = [default[("mbib", s)] - default[(other, s)] for s in seeds]
        per_seed = ", ".join(f"seed {s}: {d:+.1f}" for s, d in zip(seeds, diffs)) or "no seed has both cells yet"
        lines.append(f"- MBIB − {other.upper()}: {per_seed}; mean {mean_sd(diffs)} (paper {paper:+.1f}).")
    return lines


def cell_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        r = row["record"]
        heads = " / ".join(fmt(_head(r, h)) for h in ("v1", "v2", "v3", "z", "f+g"))
        out.append([row["run"].name, row["method"], str(row["seed"]),
                    *(fmt(r["final"].get(k)) for k in ("overall", "many", "medium", "few")),
                    fmt((r.get("best") or {}).get("overall")), heads,
                    fmt(_many_share(r)), fmt(_rho(r, "v"), 2), fmt(_rho(r, "z"), 2), fmt(_posterior(r), 3),
                    f"{r.get('best_epoch', '?')}/{r.get('epochs', '?')}", legs_text(r.get("legs"))])
    return out


def cell_stand(root: Path, run: Run, plan: Plan, method: str) -> str:
    """How far an unfinished cell got: its kept checkpoint's epoch and training hours, or "not begun"."""
    from mbib.checkpoint import load_checkpoint
    from mbib.errors import MBIBError

    path = carry_path(root / run.folder, plan, grid_cell(method, IMBALANCE_FACTOR))
    if not path.is_file():
        return "not begun"
    try:
        state = load_checkpoint(path)
    except MBIBError as exc:  # a report must still be written: say what is wrong with this one cell
        return f"checkpoint unreadable ({exc})"
    hours = float(state.get("elapsed_s", 0.0)) / 3600
    return f"epoch {int(state['epoch']) + 1}/{plan.epochs}, {hours:.1f} h trained: {legs_text(state.get('legs'))}"


def pending(root: Path, runs: Sequence[Run], dataset: str, epochs: int, extra: dict[str, str] | None) -> list[str]:
    """Runs with cells still to train, each with where it stands (a cell's checkpoint continues it)."""
    lines = []
    for run in runs:
        plan = run_plan(run, dataset, epochs, extra)
        state = run_state(root, run, plan)
        todo = [m for m in run.methods if not (state and state.cells.get(cell_key(m)))]
        if todo:
            stands = ", ".join(f"{m} ({cell_stand(root, run, plan, m)})" for m in todo)
            lines.append(f"- {run.name} ({run.lead}): {stands} in `{run.folder}/`")
    return lines


def complete(root: Path, run: Run, dataset: str, epochs: int, extra: dict[str, str] | None) -> bool:
    """Every cell of `run` trained and analysed (jobs train cells; their starter analyses them)."""
    state = run_state(root, run, run_plan(run, dataset, epochs, extra))
    return state is not None and all("analysis" in state.cells.get(cell_key(m), {}) for m in run.methods)


def write_report(root: Path, runs: Sequence[Run], dataset: str, epochs: int, command: str,
                 extra: dict[str, str] | None = None) -> Path:
    """investigation-<dataset>-<epochs>ep.md under root; notes between the markers survive a rewrite."""
    path = root / f"investigation-{dataset}-{epochs}ep.md"
    rows = collect(root, runs, dataset, epochs, extra)
    lines = [f"# Investigation: {dataset} at IF {IMBALANCE_FACTOR:g}, {epochs} epochs", "",
             f"Generated by `bench/investigation.py` on {datetime.date.today()}. Continue (resumes every run where it "
             f"stopped):", "", f"    {command}", "",
             "Each run is a `bench/reproduce.py` grid in its own folder (state, checkpoints, report). Accuracies are "
             "the last epoch's, on the balanced test set; no setting here was chosen by test accuracy. Spread = "
             "sample standard deviation over seeds. Beside them, labelled, each cell's best-on-test overall "
             "accuracy and its epoch (`best epoch`): the best of its evaluations (every 5 epochs, or every epoch "
             "where a run sets eval_every=1), chosen on the same test set it reports, as Cao et al.'s code keeps "
             "it: an optimistic number, not a result.", "",
             "## MBIB's margins, paired by seed", "", *margin_lines(rows), "",
             "## Settings, seeds pooled", "",
             *md_table(["method", "settings", "seeds", "overall", "many", "medium", "few", "v1 head", "rho z (all)",
                      "mean pos. posterior", "paper"], setting_rows(rows)), "",
             "Paper: Table 1's overall accuracy, or for MBIB's rows Table 9's overall/many/medium/few. Table 5's "
             "rho of MBIB's z is 0.86 (lower is better), Appendix D has MBIB's posterior above BIB's.", "",
             "## Every cell", "",
             *md_table(["run", "method", "seed", "overall", "many", "medium", "few", "best-on-test overall",
                       "heads v1/v2/v3/z/f+g", "many-shot share %", "rho v", "rho z", "posterior", "best epoch",
                       "epochs trained on"],
                     cell_rows(rows)), "",
             "## Still to run", "", *(pending(root, runs, dataset, epochs, extra) or ["Nothing: every run finished."]),
             "", "## Verdicts", "", NOTES_START, previous_notes(path) or "(none yet)", NOTES_END, ""]
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Train the runs in order (each resumes where it stopped), rewriting the report after each."""
    from mbib.config import parse_sets
    from mbib.errors import MBIBError
    from mbib.reproduction.cli import main as reproduce_main, run_jobs

    p = argparse.ArgumentParser(prog="bench/investigation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="bench/results", help="folder holding the runs' folders and the report")
    p.add_argument("--runs", default="", help="comma-separated run names or leads (seeds, beta, teachers, recipe, "
                                              "data, glmc, table9, neck) to train; default: every run, most "
                                              "valuable first")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once, one process each, across runs")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # a process started by --jobs
    p.add_argument("--claim-barrier", default=None, help=argparse.SUPPRESS)  # test hook: bench/reproduce.py's
    p.add_argument("--dataset", default="cifar100-lt")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every run (e.g. runtime.cpus_per_worker=2)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report; train nothing")
    args = p.parse_args(argv)
    root = Path(args.root)
    try:
        extra = parse_sets(args.overrides)
        wanted = {w.strip() for w in args.runs.split(",") if w.strip()}
        runs = [r for r in RUNS if not wanted or r.name in wanted or r.lead in wanted]
        if wanted and not runs:
            raise MBIBError(f"--runs {args.runs!r} names no run; use names or leads of: "
                            f"{', '.join(sorted({r.lead for r in RUNS}))}")
        if args.jobs < 1:
            raise MBIBError(f"--jobs {args.jobs}: give a number >= 1")
        given = list(sys.argv[1:] if argv is None else argv)
        command = "MBIB_DATA_ROOT=DIR python bench/investigation.py " + shlex.join(
            a for a in given if a != "--report-only")
        if args.jobs > 1 and not args.report_only:
            # each job walks the runs in order, so one-cell runs train side by side too; then the loop below
            # analyses each run and trains what a job left
            run_jobs(given, args.jobs, module="mbib.reproduction.investigation")
        job = ["--job", *(["--claim-barrier", args.claim_barrier] if args.claim_barrier else [])] if args.job else []
        for run in [] if args.report_only else runs:
            if complete(root, run, args.dataset, args.epochs, extra):
                continue
            print(f"== {run.name} ({run.lead}) ==", flush=True)
            code = reproduce_main(reproduce_args(root, run, args.dataset, args.epochs, extra) + job)
            if code:
                return code
            if not args.job:  # jobs leave the report to the process that started them
                write_report(root, RUNS, args.dataset, args.epochs, command, extra)
        if args.job:
            return 0
        print(f"report: {write_report(root, RUNS, args.dataset, args.epochs, command, extra)}")
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # the processes --jobs starts
    sys.exit(main())
