"""`bench/reproduce.py`: parse the plan, train and analyse the missing cells, write the report; errors as one line."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from mbib.config import apply_overrides, parse_sets
from mbib.errors import ConfigError, MBIBError
from mbib.reproduction.grid import DEFAULT_METHODS, PAPER_EPOCHS, Plan, base_config, plan_cells
from mbib.reproduction.report import summary, write_report
from mbib.reproduction.run import log_report, run_analyses, run_cells
from mbib.reproduction.state import State, machine_info


def parse_args(argv: Sequence[str] | None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="bench/reproduce.py", description="Rerun the paper's Table 1 grid (and the "
                                "Section 4.4-4.6 analyses) through the training engine; write a report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar100-lt", help="cifar100-lt, mnist-lt, digits-lt or npz:PATH")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated loss methods")
    p.add_argument("--ifs", default="100,50,10", help="comma-separated imbalance factors")
    p.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="200 = the paper's; fewer scales the schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="folder of the report and its state file")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any training setting for every cell, e.g. --set optim.batch_size=64")
    p.add_argument("--rho", action="store_true", help="Table 5: grouped rho of BSCE, BIB, MBIB at IF 100")
    p.add_argument("--posterior", action="store_true", help="Appendix D: mean positive posterior PNG at IF 100")
    p.add_argument("--beta-ablation", action="store_true", help="Figure 3: BIB and MBIB with beta 0..5 at IF 100")
    p.add_argument("--taps-ablation", action="store_true", help="Table 4: MBIB with 2..6 observations at IF 100")
    p.add_argument("--runner", choices=("ray", "plain"), default="ray",
                   help="ray: cells train on Ray Train with MLflow child runs; plain: in this process, without Ray "
                        "or MLflow (machines without Ray; all CPU to training)")
    p.add_argument("--appendix-j", action="store_true",
                   help="MBIB at IF 100 with loss.vsd_warmup_epochs=0 (Appendix J exactly, no VSD warm-up)")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --runner plain: train up to this many cells at once, each in its own process sharing "
                        "the state file and this machine's CPUs (several small cells on one GPU)")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # a process started by --jobs
    # test hook, DIR:N: a job waits after its first claim until N jobs hold one (proves they train at once)
    p.add_argument("--claim-barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="show Ray's worker logs, not only the progress bar")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the state file and the cells' kept checkpoints; train nothing "
                        "(to commit a running cell's progress)")
    args = p.parse_args(argv)
    from mbib.console import set_verbose

    set_verbose(args.verbose)
    from mbib.methods import METHODS

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {unknown or '(none given)'}: choose from {', '.join(sorted(METHODS))}")
    try:
        ifs = tuple(float(x) for x in args.ifs.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--ifs {args.ifs!r} is not a comma-separated list of numbers, e.g. --ifs 100,10") from None
    if args.epochs < 1 or not ifs:
        raise ConfigError("--epochs must be >= 1 and --ifs must name at least one imbalance factor")
    if args.jobs < 1 or (args.jobs > 1 and args.runner != "plain"):
        raise ConfigError(f"--jobs {args.jobs}: needs a number >= 1, and more than one job needs --runner plain")
    overrides = parse_sets(args.overrides)
    plan = Plan(args.dataset, args.epochs, args.seed, methods, ifs, overrides, args.rho, args.posterior,
                args.beta_ablation, args.taps_ablation, args.appendix_j, args.runner)
    apply_overrides(base_config(plan), overrides)  # a bad --set fails now, not after hours of training
    return plan, args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plan, args = parse_args(argv)
        out = Path(args.out)
        report = out / f"{plan.tag}.md"
        state = State(out / f"{plan.tag}.state.json", plan.settings())
        if args.report_only:
            write_report(plan, state, report)
            print(f"report: {report}")
            return 0
        given = list(sys.argv[1:] if argv is None else argv)
        if not args.job:
            state.note_invocation("python bench/reproduce.py " + shlex.join(given), machine_info())
        from mbib import tracking

        uri = tracking.tracking_uri(args.tracking_uri) if plan.runner == "ray" else None  # plain: no MLflow
        try:
            if args.jobs > 1:
                run_jobs(given, args.jobs)
                state.refresh()
            else:
                run_cells(plan, state, plan_cells(plan), uri, after_cell=lambda: write_report(plan, state, report),
                          on_claim=claim_barrier(args.claim_barrier))
            if args.job:
                return 0  # the process that started the jobs analyses and reports
            run_analyses(plan, state)
        finally:  # an interrupted grid still leaves a report of what finished
            write_report(plan, state, report)
        if uri:
            log_report(state, report, uri)
        summary(plan, state, report)
        if uri:
            print(f"open MLflow with: {tracking.ui_command(uri)}")
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def claim_barrier(spec: str | None, timeout_s: float = 120.0) -> Callable[[], None]:
    """--claim-barrier DIR:N: at its first claim a process notes itself in DIR and waits (at most `timeout_s`)
    until N processes have, so N cells are held at once whatever the processes' start-up times."""
    if not spec:
        return lambda: None
    folder, _, count = spec.rpartition(":")
    arrived = {"done": False}

    def wait() -> None:
        if arrived["done"]:
            return
        arrived["done"] = True
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + timeout_s
        while len(list(Path(folder).iterdir())) < int(count) and time.monotonic() < deadline:
            time.sleep(0.05)
    return wait


def run_jobs(argv: list[str], jobs: int, module: str = "mbib.reproduction.cli") -> None:
    """The same command (`python -m module argv`) in `jobs` processes at once, each with --job; each claims the
    next cell no other holds (see State)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    extra = ["--jobs", "1", "--job", "--set", f"runtime.cpus_per_worker={threads}",
             "--set", "runtime.show_progress=false"]  # later flags win; one bar per process would garble the log
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv, *extra]) for _ in range(jobs)]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise MBIBError(f"{sum(1 for c in codes if c)} of {jobs} jobs failed (exit codes {codes}): see their "
                        "errors above; rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
