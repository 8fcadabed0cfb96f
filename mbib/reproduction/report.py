"""The paper's published numbers and the Markdown report rebuilt from the state on every run."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from mbib import plots
from mbib.config import apply_overrides
from mbib.reproduction.grid import (ANALYSIS_IF, APPENDIX_J_CELL, BETAS, EXPERIMENT, ORDER_CHAIN, PAPER_EPOCHS,
                                    POSTERIOR_METHODS, RHO_METHODS, TAPS, Cell, Plan, base_config, beta_cell, carry_path,
                                    grid_cell, plan_cells, taps_cell)
from mbib.reproduction.state import State
from mbib.train.build import loss_settings

NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"
SHOTS = ("overall", "many", "medium", "few")
# Table 1: overall top-1 (%) of ResNet-32 on CIFAR-100-LT, 200 epochs; the paper publishes no shot split there
PAPER_TABLE1: dict[str, dict[float, float]] = {
    "ce": {100: 38.3, 50: 43.9, 10: 55.7},
    "focal": {100: 38.4, 50: 44.3, 10: 55.8},
    "ldam-drw": {100: 42.0, 50: 46.6, 10: 58.7},
    "bsce": {100: 42.7, 50: 47.2, 10: 58.5},
    "bib": {100: 44.9, 50: 49.8, 10: 60.4},
    "mbib": {100: 47.5, 50: 51.2, 10: 60.9},
    "gml": {100: 53.0, 50: 57.6, 10: 65.7},  # GML's own published numbers (Suh & Seo, 2023), not Table 1
}
# Table 4: MBIB overall accuracy (%) at IF 100 by observations: n taps v, or "4x" = x, v1, v2, v3 (4-MBIB(x))
PAPER_TABLE4 = {2: 45.2, 3: 46.6, 4: 46.9, 5: 46.1, 6: 45.4, "4x": 46.8}
# Table 5: rho on the CIFAR-100-LT (IF 100) test set, (many, medium, few, all)
PAPER_TABLE5 = {
    ("bsce", "v"): (1.26, 1.30, 1.48, 1.34),
    ("bib", "v"): (0.94, 1.06, 1.37, 1.06),
    ("bib", "z"): (0.80, 0.91, 1.15, 0.91),
    ("mbib", "v"): (1.01, 1.04, 1.31, 1.09),
    ("mbib", "z"): (0.78, 0.86, 1.02, 0.86),
}
PAPER_DATASETS = ("cifar100-lt",)  # the only data set whose paper numbers these are


def shots_of(metrics: dict[str, Any]) -> dict[str, float | None]:
    """An evaluation's overall / many / medium / few accuracy, by the report's names."""
    return {"overall": metrics.get("acc"), "many": metrics.get("many"), "medium": metrics.get("medium"),
            "few": metrics.get("few")}


def fmt_shots(s: dict[str, Any]) -> str:
    return "  ".join(f"{k} {fmt(s.get(k))}" for k in SHOTS)


def fmt(v: Any, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def paper_number(plan: Plan, method: str, imbalance_factor: float) -> float | None:
    if plan.dataset not in PAPER_DATASETS:
        return None
    return PAPER_TABLE1.get(method, {}).get(imbalance_factor)


def md_table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def grid_rows(plan: Plan, state: State) -> list[list[str]]:
    cells = [(m, grid_cell(m, f)) for m in plan.methods for f in plan.ifs]
    if plan.appendix_j:
        cells.append(("mbib, Appendix J (no VSD warm-up)", APPENDIX_J_CELL))
    rows = []
    for label, cell in cells:
        rec = state.cells.get(cell.key)
        paper = paper_number(plan, cell.method, cell.imbalance_factor)
        f = cell.imbalance_factor
        if rec is None:
            rows.append([label, f"{f:g}", "not run yet", "", "", "", fmt_paper(paper), "", "", "", ""])
            continue
        s = rec["final"]
        diff = f"{s['overall'] - paper:+.1f}" if paper is not None and s["overall"] is not None else "n/a"
        rows.append([label, f"{f:g}", *(fmt(s[k]) for k in SHOTS), fmt_paper(paper), diff,
                     f"{fmt(rec['best']['overall'])} (ep {rec['best_epoch']})", f"{rec['seed']} ({rec.get('commit')})",
                     f"{rec['wall_s']:.0f}"])
    return rows


def legs_text(legs: Sequence[dict[str, Any]] | None) -> str:
    """Which epochs trained where: "1-105 cpu (AVX512), bfloat16; 106-200 cpu (AVX2), fp32"."""
    return "; ".join(f"{leg['first']}-{leg['last']} {leg['device']}" for leg in legs) if legs else "not recorded"


def legs_lines(plan: Plan, state: State) -> list[str]:
    """Each finished cell's legs: a grid continued on other machines mixes devices and precisions per cell."""
    return [f"- `{c.key}`: {legs_text(state.cells[c.key].get('legs'))}" for c in plan_cells(plan)
            if c.key in state.cells]


def fmt_paper(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def ordering_lines(plan: Plan, state: State) -> list[str]:
    """Does CE < BSCE < BIB < MBIB (overall) hold at each IF, and what do the few-shot classes gain?"""
    lines = []
    for f in plan.ifs:
        recs = {m: state.cells[grid_cell(m, f).key]["final"] for m in ORDER_CHAIN
                if grid_cell(m, f).key in state.cells}
        if len(recs) < 2:
            continue
        chain = list(recs)
        values = [recs[m]["overall"] for m in chain]
        holds = all(a < b for a, b in zip(values, values[1:]))
        order = " < ".join(f"{m.upper()} {fmt(v)}" for m, v in sorted(zip(chain, values), key=lambda t: t[1]))
        lines.append(f"- IF {f:g}: paper's order {' < '.join(c.upper() for c in chain)} "
                     f"**{'holds' if holds else 'does not hold'}**; measured {order}.")
        few = {m: recs[m]["few"] for m in chain}
        if all(v is None or math.isnan(v) for v in few.values()):
            lines.append("  No few-shot classes (< 20 training images) at this IF.")
        else:
            first, last = chain[0], chain[-1]
            gain = (f"; {last.upper()} − {first.upper()} = {few[last] - few[first]:+.1f} points"
                    if few[first] is not None and few[last] is not None else "")
            listed = ", ".join(f"{m.upper()} {fmt(v)}" for m, v in few.items())
            lines.append(f"  Few-shot accuracy: {listed}{gain}.")
    return lines


def analysed(state: State, plan: Plan, methods: Sequence[str], kind: str) -> dict[str, Any]:
    """{method: the IF-100 cell's analysis[kind]} for the methods whose cell has been analysed."""
    cells = {m: state.cells.get(grid_cell(m, ANALYSIS_IF).key, {}) for m in methods}
    return {m: rec["analysis"][kind] for m, rec in cells.items() if kind in rec.get("analysis", {})}


def rho_section(plan: Plan, state: State) -> list[str]:
    done = analysed(state, plan, RHO_METHODS, "rho")
    rows = []
    for m in RHO_METHODS:
        for feat, vals in done.get(m, {}).items():
            paper = PAPER_TABLE5.get((m, feat)) if plan.dataset in PAPER_DATASETS else None
            rows.append([f"{m.upper()}_{feat}", *(fmt(vals[g], 2) for g in ("many", "medium", "few", "all")),
                         " / ".join(f"{p:.2f}" for p in paper) if paper else "n/a"])
    if not rows:
        return ["Not computed yet (needs BSCE, BIB and MBIB at IF 100)."]
    return ["rho = D_intra / D_inter (Eq. 15-17) of the test-set representations; smaller is better. v is the final",
            "observation (GAP'd last stage), z the bottleneck. Computed on each cell's final model.", "",
            *md_table(["Features", "Many", "Medium", "Few", "All", "Paper (many / medium / few / all)"], rows)]


def posterior_section(plan: Plan, state: State, out_dir: Path) -> list[str]:
    done = analysed(state, plan, POSTERIOR_METHODS, "posterior")
    if not done:
        return ["Not computed yet (needs CE, BSCE, BIB and MBIB at IF 100)."]
    png = out_dir / f"{plan.tag}-posterior.png"
    plots.plot_posterior(done, png)  # classes of long-tailed sets are numbered head -> tail (lt_class_counts)
    rows = [[m.upper(), fmt(_mean(v), 3), fmt(_mean(v[: len(v) // 3]), 3), fmt(_mean(v[-(len(v) // 3):]), 3)]
            for m, v in done.items()]
    return [f"![mean positive posterior]({png.name})", "",
            "Mean positive posterior q̄(y_i|x) (Eq. 14) per class on the test set, classes ordered by training size",
            "(head left); the lower panels are the differences Appendix D plots (BIB−CE, BIB−BSCE, MBIB−BIB).",
            "",
            *md_table(["Method", "Mean over classes", "Head third", "Tail third"], rows)]


def _mean(v: Sequence[float | None]) -> float:
    vals = [x for x in v if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


def beta_section(plan: Plan, state: State, out_dir: Path) -> list[str]:
    rows, series = [], {}
    for m in ("bib", "mbib"):
        vals = [state.cells.get(beta_cell(m, b).key, {}).get("final", {}).get("overall") for b in BETAS]
        series[m] = vals
        rows.append([m.upper(), *(fmt(v) for v in vals)])
    lines = [*md_table(["Method", *(f"β={b:g}" for b in BETAS)], rows), "",
             "Overall accuracy at IF 100 (a = 0.1, b = 0.3 as in Figure 3). Figure 3 gives its values only as a plot,",
             "so there are no published numbers to set beside these."]
    if any(v is not None for vals in series.values() for v in vals):
        png = out_dir / f"{plan.tag}-beta.png"
        plots.plot_beta_ablation(series, BETAS, png, f"{plan.dataset} IF 100, {plan.epochs} epochs")
        lines = [f"![beta ablation]({png.name})", "", *lines]
    return lines


def taps_section(plan: Plan, state: State) -> list[str]:
    rows = []
    for n in TAPS:
        rec = state.cells.get(taps_cell(n).key)
        ours = rec["final"]["overall"] if rec else None
        paper = PAPER_TABLE4[n] if plan.dataset in PAPER_DATASETS else None
        diff = f"{ours - paper:+.1f}" if ours is not None and paper is not None else "n/a"
        rows.append(["4-MBIB(x)" if n == "4x" else f"{n}-MBIB", fmt(ours), fmt_paper(paper), diff])
    return [*md_table(["Observations", "Overall", "Paper (Table 4)", "Δ"], rows), "",
            "IF 100; a = 0 for 2-MBIB, a = b = 0.3 otherwise (Table 4's setting). 4-MBIB(x) adds BIB(x, z) on the",
            "input image's GAP (model.input_tap) as the shallowest observation, with weight a."]


def loss_line(plan: Plan, base) -> str:
    """Each method's loss settings as its criterion gets them, e.g. "bsce m 0; mbib beta 5, a 0.1, ..."."""
    out = []
    for method in plan.methods:
        cfg = apply_overrides(base, {"loss.method": method, **plan.overrides})
        got = {k: v for k, v in loss_settings(cfg).items() if v is not None and k != "drw_epoch"}
        out.append(f"{method} " + (", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in got.items()) or "none"))
    return "; ".join(out)


def write_report(plan: Plan, state: State, path: Path) -> Path:
    base = apply_overrides(base_config(plan), plan.overrides)
    o = base.optim
    factors = ", ×".join(f"{x:g}" for x in o.milestone_factors)
    settings_line = (f"ResNet-32, batch {o.batch_size}, SGD lr {o.lr} momentum {o.momentum} wd {o.weight_decay}, "
                     f"warm-up {o.warmup_epochs:g} epochs, lr ×{factors} at epochs "
                     f"{', '.join(map(str, o.milestones))}, "
                     f"LDAM-DRW re-weighting from epoch {base.loss.drw_epoch} "
                     "(all scaled from the paper's 200-epoch schedule)")
    # the settings that decide the numbers: not how a machine ran them (threads, progress bars, test hooks)
    overrides = ", ".join(f"`{k}={v}`" for k, v in plan.settings()["overrides"].items()) or "none"
    recs = [state.cells[c.key] for c in plan_cells(plan) if c.key in state.cells]
    paper_note = ("Paper = Table 1 (CIFAR-100-LT, 200 epochs), which publishes overall accuracy only; for GML the "
                  "number is GML's own publication." if plan.dataset in PAPER_DATASETS else
                  f"Paper: n/a: the paper publishes no {plan.dataset} numbers; the CIFAR-100-LT numbers of Table 1 "
                  "are listed in `mbib.reproduction.report.PAPER_TABLE1`.")
    lines = [f"# Reproduction: {plan.dataset}, {plan.epochs} epochs", "",
             f"Generated by `bench/reproduce.py` on {datetime.date.today().isoformat()}. Command of the last run:", "",
             f"    {state.data['commands'][-1] if state.data['commands'] else ''}", "",
             f"- Data set: `{plan.dataset}`; seed {plan.seed}; {plan.epochs} epochs (the paper trains {PAPER_EPOCHS}).",
             f"- Schedule: {settings_line}.",
             f"- Extra settings (`--set`): {overrides}. GML rows use strong augmentation (AutoAugment + Cutout), "
             "as GML publishes; every other method uses crop + flip.",
             f"- Loss settings each method trains with (its paper defaults unless `--set`): {loss_line(plan, base)}.",
             f"- Cells finished: {len(recs)}; total training wall time {sum(r['wall_s'] for r in recs) / 60:.1f} min.",
             *(f"- Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, "
               f"device {m['device']}." for m in state.data["machines"]),
             *mlflow_lines(state), *data_caveat(plan),
             "", "## Table 1: top-1 accuracy (%)", "",
             "Ours = the last epoch's evaluation on the balanced test set; many > 100, medium 20-100, few < 20 "
             f"training images a class; Δ = ours − paper (overall). {paper_note} \"Best\" is the best evaluation "
             "during training (selected on the test set, so optimistic).", "",
             *md_table(["Method", "IF", "Overall", "Many", "Medium", "Few", "Paper", "Δ", "Best (epoch)",
                      "Seed (commit)", "Wall (s)"], grid_rows(plan, state)), ""]
    if recs:
        lines += ["## Where each cell trained", "", "Epochs, device and precision of each leg, from the cell's "
                  "checkpoints (\"not recorded\": trained before checkpoints kept this).", "",
                  *legs_lines(plan, state), ""]
    order = ordering_lines(plan, state)
    if order:
        lines += ["## The paper's ordering", "", *order, ""]
    lines += ["## Heads, and the lean to the head classes", "", *heads_section(plan, state), ""]
    if plan.rho:
        lines += ["## Table 5: representation ratio rho (IF 100)", "", *rho_section(plan, state), ""]
    if plan.posterior:
        lines += ["## Appendix D: mean positive posterior (IF 100)", "",
                  *posterior_section(plan, state, path.parent), ""]
    if plan.beta_ablation:
        lines += ["## Figure 3: β ablation (IF 100)", "", *beta_section(plan, state, path.parent), ""]
    if plan.taps_ablation:
        lines += ["## Table 4: number of observations v (IF 100)", "", *taps_section(plan, state), ""]
    pending = [pending_text(path.parent, plan, c) for c in plan_cells(plan) if c.key not in state.cells]
    if pending:
        lines += ["## Still to run", "", f"Cells not finished yet: {', '.join(pending)}. The command above, rerun on "
                  "a fresh clone, continues them (a cell interrupted part-way continues from its checkpoint "
                  f"under `{path.parent.name}/cells/`).", ""]
    lines += ["## Reproduce on CIFAR-100-LT", "",
              "On a machine with CIFAR-100 (torchvision's `cifar-100-python/`, `cifar100.npz` or `cifar100.zip` "
              "under the data root):", "",
              "    MBIB_DATA_ROOT=/path/to/data python bench/reproduce.py --epochs 200 --rho --posterior "
              "--beta-ablation --taps-ablation", "",
              "writes `bench/results/reproduction-cifar100-lt-200ep.md` (8 methods x 3 IFs, plus the analyses' extra cells); "
              "rerunning the same command resumes an interrupted grid.", "",
              NOTES_START, previous_notes(path), NOTES_END, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def pending_text(out: Path, plan: Plan, cell: Cell) -> str:
    """A cell still to run, with how far its kept checkpoint got."""
    carry = carry_path(out, plan, cell)
    if not carry.is_file():
        return cell.key
    state = torch.load(carry, map_location="cpu", weights_only=True)
    done, m = int(state["epoch"]) + 1, state.get("metrics") or {}
    last = f"; at epoch {done}: {fmt_shots(shots_of(m))}" if "acc" in m else ""
    return f"{cell.key} ({done} of {plan.epochs} epochs done{last})"


def data_caveat(plan: Plan) -> list[str]:
    """The JPEG caveat of shared/data/README.md, when CIFAR-100 is read from cifar100.zip."""
    from mbib.data.cifar import CIFAR100
    from mbib.data.datasets import cifar_source, resolve_data_root

    source = cifar_source(CIFAR100, resolve_data_root(plan.overrides.get("data.data_root")))
    if plan.dataset != "cifar100-lt" or source is None or source.suffix != ".zip":
        return []
    return [f"- CIFAR-100 was read from `{source.name}`: JPEG files of the original images. JPEG is lossy, so "
            "pixels differ slightly from the original pickles (expect somewhat lower accuracy, for every method "
            "alike), and the original order of the training images is not kept, so Cao et al.'s long-tailed "
            "subsampling picks a different, equally valid subset of each class."]


HEAD_NAMES = {"z": "g(z)", "f+g": "mean f+g"}


def heads_section(plan: Plan, state: State) -> list[str]:
    """Per analysed cell: each head's accuracy, and the share of its predictions on many-shot classes against
    the balanced share (a classifier without a lean to the head predicts many-shot classes that often)."""
    rows = []
    for cell in plan_cells(plan):
        a = state.cells.get(cell.key, {}).get("analysis")
        if not a:
            continue
        heads = a["heads"]
        order = [h for h in heads if h.startswith("v")] + [h for h in ("z", "f+g") if h in heads]
        show = lambda fn: " · ".join(f"{HEAD_NAMES.get(h, h)} {fmt(fn(heads[h]))}" for h in order)  # noqa: E731
        rows.append([cell.key, show(lambda d: d["acc"]), show(lambda d: d["share"]["many"]),
                     fmt(a["balanced_share"]["many"])])
    if not rows:
        return ["No cell analysed yet."]
    return ["Accuracy (%) of every head on the test set (f = the final tap's head v3 or v_n, g = the z head; the",
            "prediction is their mean), and the percent of each head's test predictions that name a many-shot",
            "class (> 100 training images), against the balanced share (the many-shot classes' share of the test",
            "set). Final model of each cell.", "",
            *md_table(["Cell", "Accuracy by head", "Predictions on many-shot classes (%)", "Balanced (%)"], rows)]


def mlflow_lines(state: State) -> list[str]:
    run = state.data.get("mlflow")
    if not run:
        return []
    return [f"- MLflow: experiment `{EXPERIMENT}`, parent run `{run['parent_run_id']}` in `{run['tracking_uri']}`."]


def previous_notes(path: Path) -> str:
    """Hand-written notes between the markers survive regeneration."""
    if not path.is_file():
        return ""
    text = path.read_text()
    start, end = text.find(NOTES_START), text.find(NOTES_END)
    return text[start + len(NOTES_START):end].strip("\n") if 0 <= start < end else ""


def summary(plan: Plan, state: State, report: Path) -> None:
    print(f"\n{plan.dataset}, {plan.epochs} epochs: overall / many / medium / few (paper overall)")
    for m in plan.methods:
        for f in plan.ifs:
            rec = state.cells.get(grid_cell(m, f).key)
            shots = fmt_shots(rec["final"]) if rec else "not run"
            print(f"  {m:>10} IF {f:>4g}: {shots}   ({fmt_paper(paper_number(plan, m, f))})")
    for line in ordering_lines(plan, state):
        print(line)
    print(f"report: {report}\nstate:  {state.path}")
