"""The CIFAR-100-LT study's report, from its committed folder (Tune state and results; finished or not).

    python bench/study_report.py                       # bench/results/study-cifar100-lt -> study-cifar100-lt.md

Every trial (settings, epochs reached, ASHA's verdict, selection score and chosen epoch, held-out accuracy), the
paper's point (trial 1) against the best, Optuna's importances, the a-b heatmap, how well each ASHA rung ranks
the trials as the last epoch does, and the CPU hours used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mbib.study.results import TrialRow, best_row, collect_rows, finite, param_importances, unfinished  # noqa: E402
from mbib.study.spec import SEARCH_SPACE  # noqa: E402

STUDY = "cifar100-lt-mbib"
KEY = "cifar100-lt-if100"
CONTINUE = "bash bench/run_study.sh"  # the committed command that starts or continues the study
NUM_TRIALS = 8  # its --num-samples


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks on ties); None under three pairs, where it says nothing."""
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return None
    rho = spearmanr(xs, ys).statistic
    return float(rho) if finite(float(rho)) else None


def rung_agreement(rows: list[TrialRow], rungs: list[int], max_epochs: int) -> list[tuple[int, int, float | None, str]]:
    """Per rung: (rung, trials compared, rank correlation, against what). Against the final selection score over the
    trials that finished; while too few have, against the next rung over the trials that reached it (labelled)."""
    out = []
    done = [r for r in rows if r.state == "COMPLETE"]
    for i, rung in enumerate(rungs):
        if len(done) >= 3:
            pairs = [(r.intermediate[rung], r.score) for r in done if rung in r.intermediate]
            what = f"final score (best epoch of {max_epochs})"
        else:
            nxt = rungs[i + 1] if i + 1 < len(rungs) else max_epochs
            pairs = [(r.intermediate[rung], r.intermediate[nxt]) for r in rows
                     if rung in r.intermediate and nxt in r.intermediate]
            what = f"score at epoch {nxt} (too few finished trials for the final)"
        out.append((rung, len(pairs), spearman([a for a, _ in pairs], [b for _, b in pairs]), what))
    return out


def tune_states(exp: Path) -> dict[str, str]:
    """trial id -> Tune's status in the newest experiment state (RUNNING there: in flight when the driver stopped)."""
    from mbib.study.search import saved_trials

    return {t["trial_id"]: t.get("status", "") for t in saved_trials(exp) or []}


def verdict(row: TrialRow, status: str, max_epochs: int) -> str:
    if row.state == "FAIL":
        return "failed"
    if status in ("RUNNING", "PENDING", "PAUSED"):
        return f"in flight ({status.lower()} when the driver stopped)"
    return "full budget" if row.epochs_done >= max_epochs else f"stopped by ASHA at {row.epochs_done}"


def f1(v, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if finite(v) else "n/a"


def trial_table(rows: list[TrialRow], states: dict[str, str], max_epochs: int) -> list[str]:
    lines = ["| # | beta | a | b | m | gamma | epochs | verdict | selection score @ epoch | held-out acc (many / med / few) "
             "| whole test set acc |", "|" + "---|" * 11]
    for r in rows:
        m = r.metrics
        lines.append(f"| {r.number} | " + " | ".join(f1(r.params[k], 2) for k in SEARCH_SPACE)
                     + f" | {r.epochs_done} | {verdict(r, states.get(r.trial_id, ''), max_epochs)} "
                     f"| {f1(r.score)} @ {r.epoch} | {f1(m.get('heldout_acc'))} ({f1(m.get('heldout_many'))} / "
                     f"{f1(m.get('heldout_medium'))} / {f1(m.get('heldout_few'))}) | {f1(m.get('acc'))} |")
    return lines


def cpu_hours(exp: Path, cpus_per_trial: float) -> float:
    """Each trial's wall time (its last report's time_total_s, restarts included) times the CPUs it held."""
    total = 0.0
    for res in exp.glob("*/result.json"):
        last = [json.loads(x) for x in res.read_text().splitlines() if x.strip()][-1:]
        total += float(last[0].get("time_total_s", 0.0)) if last else 0.0
    return total * cpus_per_trial / 3600


def main(argv=None) -> int:
    from ray import tune

    from mbib.plots import plot_ab_heatmap
    from mbib.study.search import run_trial

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(REPO / "bench/results/study-cifar100-lt"))
    p.add_argument("--out", default=str(REPO / "bench/results/study-cifar100-lt.md"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--grace-period", type=int, default=20)
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--machine", default="", help="where it ran, one line (CPU, precision)")
    args = p.parse_args(argv)
    folder = Path(args.folder).resolve()
    exp = folder / "runs" / STUDY / KEY
    rows = collect_rows(tune.Tuner.restore(str(exp), trainable=run_trial).get_results(), args.epochs)
    states = tune_states(exp)
    rungs, r = [], args.grace_period
    while r < args.epochs:
        rungs.append(r)
        r *= args.reduction_factor
    best = best_row(rows)
    scored = [x for x in rows if args.grace_period in x.intermediate]
    importances, basis = (param_importances(rows) if len(scored) >= 4 else
                          ({}, f"not computed: {len(scored)} trials have reached the first rung, 4 are needed"))
    finished = not unfinished(list(states.values()), NUM_TRIALS)
    heat = plot_ab_heatmap(rows, folder / "ab_heatmap.png", f"{KEY}: selection score over a, b")
    paper = next((x for x in rows if x.number == 1), None)
    out = ["# CIFAR-100-LT study (IF 100) through Ray Tune, Ray Train and MLflow, on the CPU",
           "",
           f"**Status: {'finished' if finished else 'in progress'}.** {len(rows)} trials started of the study's {NUM_TRIALS}; "
           f"{sum(x.state == 'COMPLETE' for x in rows)} at the full {args.epochs} epochs, "
           f"{sum(verdict(x, states.get(x.trial_id, ''), args.epochs).startswith('stopped') for x in rows)} stopped by ASHA. "
           f"CPU time{'' if finished else ' so far'}: {cpu_hours(exp, args.cpus_per_trial):.1f} CPU-hours. {args.machine}",
           "",
           "Numbers: the selection score is the accuracy on the selection half of the test set (50 images a class), "
           "which chose each trial's epoch and ranks the trials; the held-out accuracy, on the other half, is the "
           "number to report. The whole test set's accuracy is shown beside it, labelled: it includes the selection half.",
           "", *trial_table(rows, states, args.epochs), ""]
    if best is not None and paper is not None:
        out += [f"**{'Best' if finished else 'Best so far'}**: trial {best.number} (" + ", ".join(f"{k} {best.params[k]:.2f}" for k in SEARCH_SPACE)
                + f"), selection {f1(best.score)} at epoch {best.epoch}, held-out {f1(best.metrics.get('heldout_acc'))}. "
                f"**The paper's point** (trial 1: beta 5, a 0.1, b 0.3, m 0.1, gamma 0): selection {f1(paper.score)} at "
                f"epoch {paper.epoch}, held-out {f1(paper.metrics.get('heldout_acc'))}, after {paper.epochs_done} epochs. "
                "The paper reports 47.5 for MBIB (GML 53.0), chosen on the test set.", ""]
    out += ["## Do ASHA's early rungs rank the trials as the last epoch does?", "",
            "The lr stays 0.1 until epoch 160, so early scores may mislead. Spearman's rank correlation of each rung's "
            "selection score:", "", "| rung (epoch) | trials | rank correlation | against |", "|---|---|---|---|"]
    agreement = rung_agreement(rows, rungs, args.epochs)
    out += [f"| {rung} | {n} | {f1(rho, 2) if rho is not None else 'n/a (under 3 trials)'} | {what} |"
            for rung, n, rho, what in agreement]
    fewest = min((n for _, n, _, _ in agreement), default=0)
    if fewest < 5:  # ASHA keeps about one in three per rung: eight trials leave two or three past the first
        most = max(n for _, n, _, _ in agreement)
        out += ["", f"With {fewest if fewest == most else f'{fewest}-{most}'} trials per rung these coefficients cannot "
                "tell a good ranking from a poor one (with 3 trials a coefficient of 0.5 is one swapped pair). By "
                "design an 8-trial ASHA study leaves few trials past its first rung, so the test needs trials that "
                "ASHA stopped: training the two best stopped trials (6 and 7) to the full budget (about 6 CPU-hours "
                "here) gives five finished trials to rank; if the first rung then misranks them, the fix to try is "
                "rungs that retrain with a schedule scaled to the rung's budget rather than read the constant-lr "
                "epochs of the full schedule."]
    out += ["", f"## Optuna's importances ({basis})", "",
            ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) or "none yet", "",
            f"![a-b heatmap]({heat.relative_to(Path(args.out).parent)})", "",
            *served_section(folder, Path(args.out).parent), *mlflow_section(folder, Path(args.out).parent),
            "## Commands", "",
            "Started, and continued from any clone (another path or machine; nothing reruns), with:", "",
            f"    {CONTINUE}", "",
            "which runs `studies/cifar_grid.py --only cifar100-lt-if100 --num-samples 8 --grace-period 20 "
            "--reduction-factor 3 --max-concurrent 2 --gpus-per-trial 0 --set runtime.cpus_per_worker=1 "
            "--storage-path bench/results/study-cifar100-lt/runs --tracking-uri "
            "sqlite:///bench/results/study-cifar100-lt/mlflow.db --resume`. Between commits the folder is copied out "
            "of the worktree that runs it with `bash bench/keep_study.sh ../study`; this page is written by "
            "`python bench/study_report.py`. The MLflow view: `mlflow ui --backend-store-uri "
            "sqlite:///bench/results/study-cifar100-lt/mlflow.db`.", ""]
    Path(args.out).write_text("\n".join(out))
    print(f"{args.out}: {len(rows)} trials, {'finished' if finished else 'in progress'}")
    return 0


def served_section(folder: Path, page: Path) -> list[str]:
    """What bench/served_accuracy.py measured: the model behind the real Serve app against its recorded numbers."""
    path = folder / "served.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    s, r = d["served_heldout"], d["recorded_heldout"]
    g = lambda m: f"{m['acc']:.2f} ({m['many']:.1f} / {m['medium']:.1f} / {m['few']:.1f})"  # noqa: E731
    which = ("" if d["model"].startswith("models:/") else
             " (a checkpoint: the best trial's so far; the study registers its best when it ends)")
    return ["## Served over HTTP", "",
            f"`{d['model']}`{which} (epoch {d['epoch']}) behind the real Serve app ({d['ingress']} ingress): the "
            f"{d['images']:,} held-out test images sent as the data set's own JPEG files to `POST /classify` score "
            f"**{g(s)}**; the checkpoint recorded {g(r)} (difference {d['difference_points']:+.2f} points). "
            f"Written by `bench/served_accuracy.py` to [{path.name}]({path.relative_to(page)}).", ""]


def mlflow_section(folder: Path, page: Path) -> list[str]:
    """The screenshots `cluster/screenshot_ui.py` took of this store in the MLflow UI."""
    shots = [(name, folder / f"{name}.png") for name in ("mlflow-runs", "mlflow-parent-plots")]
    if not any(p.is_file() for _, p in shots):
        return []
    return ["## In the MLflow UI", "",
            "Taken with `cluster/screenshot_ui.py` (headless Chromium) against `mlflow server` on a copy of the store: "
            "the run list (the parent, a child run per trial) and the parent's plots, which are redrawn as each trial "
            "ends.", "", *(f"![{name}]({p.relative_to(page)})" for name, p in shots if p.is_file()), ""]


if __name__ == "__main__":
    sys.exit(main())
