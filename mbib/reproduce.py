"""Reproduction of the paper's CIFAR-100-LT results (Table 1, 4, 5; Figure 3; Appendix D) as one resumable command.

Every cell (one method at one IF, or one ablation setting) trains through `run_training` and is recorded in a
JSON state file next to the report as soon as it finishes, so a rerun skips finished cells. The report is
rebuilt from the state file on every run; text between the notes markers of an existing report is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mbib import plots
from mbib.config import TrainConfig, apply_overrides, parse_sets, resolve_config
from mbib.errors import ConfigError, MBIBError

EXPERIMENT = "reproduction"
DEFAULT_METHODS = ("ce", "focal", "bsce", "ldam-drw", "bib", "mbib", "gml", "mbib-gml")
DEFAULT_IFS = (100.0, 50.0, 10.0)
PAPER_EPOCHS = 200
NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"

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
# GML's published results use AutoAugment + Cutout; the other methods use the paper's crop + flip
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {"gml": {"data.augment": "strong"},
                                                "mbib-gml": {"data.augment": "strong"}}
ORDER_CHAIN = ("ce", "bsce", "bib", "mbib")  # the ordering Table 1 shows: CE < BSCE < BIB < MBIB
RHO_METHODS = ("bsce", "bib", "mbib")
POSTERIOR_METHODS = ("ce", "bsce", "bib", "mbib")
BETAS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
TAPS = (2, 3, 4, 5, 6, "4x")
ANALYSIS_IF = 100.0  # Table 4, Table 5 and Figure 3 are at IF 100
NON_RESULT_KEYS = ("runtime.storage_path", "runtime.show_progress")  # may differ between resumed runs
SHOTS = ("overall", "many", "medium", "few")


@dataclass(frozen=True)
class Cell:
    """One training run of the reproduction: a method at an IF with extra config overrides."""

    key: str  # the state-file key, e.g. "grid/bib/IF100"
    method: str
    imbalance_factor: float
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Plan:
    dataset: str
    epochs: int
    seed: int
    methods: tuple[str, ...]
    ifs: tuple[float, ...]
    overrides: dict[str, str]
    rho: bool = False
    posterior: bool = False
    beta_ablation: bool = False
    taps_ablation: bool = False
    appendix_j: bool = False
    runner: str = "ray"  # "ray" (Ray Train + MLflow) or "plain" (this process: no Ray, no MLflow)

    @property
    def tag(self) -> str:
        """File stem: reproduction-<dataset>-<epochs>ep."""
        name = Path(self.dataset.split(":", 1)[1]).stem if ":" in self.dataset else self.dataset
        return f"reproduction-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{self.epochs}ep"

    def settings(self) -> dict[str, Any]:
        """What determines the numbers: a resumed grid must match it."""
        kept = {k: v for k, v in sorted(self.overrides.items()) if k not in NON_RESULT_KEYS}
        return {"dataset": self.dataset, "epochs": self.epochs, "seed": self.seed, "overrides": kept}


def if_label(imbalance_factor: float) -> str:
    return f"IF{imbalance_factor:g}"


def grid_cell(method: str, imbalance_factor: float) -> Cell:
    return Cell(f"grid/{method}/{if_label(imbalance_factor)}", method, imbalance_factor,
                tuple(sorted(METHOD_OVERRIDES.get(method, {}).items())))


def beta_cell(method: str, beta: float) -> Cell:
    if beta == TrainConfig().loss.beta:
        return grid_cell(method, ANALYSIS_IF)  # the grid already trains the default beta
    return Cell(f"beta/{method}/beta{beta:g}", method, ANALYSIS_IF, (("loss.beta", beta),))


def taps_cell(n: int | str) -> Cell:
    """Table 4's cell: n observations v1..vn, or "4x" (the input image x, then v1..v3)."""
    a = 0.0 if n == 2 else 0.3  # Table 4: a = 0 in 2-MBIB, a = b = 0.3 in the others
    taps = (("model.num_taps", 3), ("model.input_tap", True)) if n == "4x" else (("model.num_taps", n),)
    return Cell(f"taps/{n}", "mbib", ANALYSIS_IF, (("loss.a", a), ("loss.b", 0.3), *taps))


# MBIB exactly as Appendix J trains it: beta = 5 from the first step, without the project's VSD warm-up
APPENDIX_J_CELL = Cell("appendix-j/mbib/IF100", "mbib", ANALYSIS_IF, (("loss.vsd_warmup_epochs", 0.0),))


def plan_cells(plan: Plan) -> list[Cell]:
    """Every cell the requested tables need, in training order, without duplicates."""
    cells = [grid_cell(m, f) for m in plan.methods for f in plan.ifs]
    if plan.rho:
        cells += [grid_cell(m, ANALYSIS_IF) for m in RHO_METHODS]
    if plan.posterior:
        cells += [grid_cell(m, ANALYSIS_IF) for m in POSTERIOR_METHODS]
    if plan.beta_ablation:
        cells += [beta_cell(m, b) for m in ("bib", "mbib") for b in BETAS]
    if plan.taps_ablation:
        cells += [taps_cell(n) for n in TAPS]
    if plan.appendix_j:
        cells.append(APPENDIX_J_CELL)
    return list({c.key: c for c in cells}.values())


def base_config(plan: Plan) -> TrainConfig:
    """Section 4.2's CIFAR-100-LT setup on the chosen data, schedule (and LDAM-DRW's epoch) scaled to plan.epochs."""
    return resolve_config("cifar100-lt", {"data.dataset": plan.dataset, "model.arch": "resnet32",
                                          "runtime.seed": plan.seed, "experiment": EXPERIMENT}, epochs=plan.epochs)


def cell_config(plan: Plan, base: TrainConfig, cell: Cell) -> TrainConfig:
    """The cell's settings over the base, then the user's --set values over both. The run name is fixed per
    cell and seed, so rerunning an interrupted cell on the same machine continues its Ray Train run."""
    run_name = f"{plan.tag}-{cell.key.replace('/', '-')}-seed{plan.seed}"
    return apply_overrides(base, {"loss.method": cell.method, "data.imbalance_factor": cell.imbalance_factor,
                                  **dict(cell.overrides), **plan.overrides, "run_name": run_name})


def carry_path(out: Path, plan: Plan, cell: Cell) -> Path:
    """Where a running cell keeps a copy of its latest checkpoint: committed with the state, it lets another
    machine continue the cell (runtime.resume_from) instead of starting it over."""
    return out / "cells" / plan.tag / f"{cell.key.replace('/', '-')}-seed{plan.seed}.pt"


# --------------------------------------------------------------------------- state


class State:
    """The JSON record of finished cells (each with its analysis); written atomically after every change."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = path
        if path.is_file():
            self.data = json.loads(path.read_text())
            if self.data.get("settings") != settings:
                raise ConfigError(f"{path} was written with other settings ({self.data.get('settings')}): "
                                  "rerun with those, or pass another --out / delete the file")
        else:
            self.data = {"settings": settings, "cells": {}, "machines": [], "commands": []}

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def note_invocation(self, command: str, machine: dict[str, Any]) -> None:
        if machine not in self.data["machines"]:
            self.data["machines"].append(machine)
        self.data["commands"].append(command)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_json_safe(self.data), indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _json_safe(obj: Any) -> Any:
    """NaN (a shot group without classes) becomes null, which JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when the tree differs from it), None outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict[str, Any]:
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "device": device}


# --------------------------------------------------------------------------- training


def shots_of(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {"overall": metrics.get("acc"), "many": metrics.get("many"), "medium": metrics.get("medium"),
            "few": metrics.get("few")}


def train_cell(plan: Plan, base: TrainConfig, cell: Cell, tracking_uri: str | None,
               parent_run_id: str | None, carry: Path) -> dict[str, Any]:
    """Train one cell on Ray Train (an MLflow child run) or, with plan.runner "plain", in this process."""
    cfg = cell_config(plan, base, cell)
    start = time.perf_counter()
    if plan.runner == "plain":
        from mbib.train.plain import run_plain

        out = run_plain(cfg, carry, log=lambda line: print(f"  {line}", flush=True))
        final, best, extra = out.metrics, out.best_metrics, {"runner": "plain"}
    else:
        from mbib.train.runner import CopyLatestCheckpoint, run_training

        if carry.is_file():
            print(f"  continuing from {carry}", flush=True)
            cfg.runtime.resume_from = str(carry)
        ray_out = run_training(cfg, track=tracking_uri is not None, tracking_uri=tracking_uri,
                               parent_run_id=parent_run_id, callbacks=[CopyLatestCheckpoint(carry)])
        final, best = ray_out.metrics, ray_out.best_metrics or ray_out.metrics
        extra = {"runner": "ray", "mlflow_run_id": ray_out.mlflow_run_id, "run_name": cfg.run_name}
    return {"method": cell.method, "imbalance_factor": cell.imbalance_factor, "overrides": dict(cell.overrides),
            "final": shots_of(final), "best": shots_of(best), "best_epoch": int(best.get("epoch", -1)) + 1,
            "epochs": cfg.optim.epochs, "seed": cfg.runtime.seed, "commit": git_commit(),
            # training time over every machine the cell ran on (carried in its checkpoints), else this leg's
            "wall_s": final.get("elapsed_s", time.perf_counter() - start), "final_checkpoint": str(carry),
            "final_heads": {k: v for k, v in final.items() if k.startswith("acc_")},
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), **extra}


def parent_run(state: State, plan: Plan, tracking_uri: str) -> str:
    """One MLflow parent run per report, reused when the grid resumes against the same store."""
    from mbib.tracking.runs import report_parent_run

    params = {"dataset": plan.dataset, "epochs": plan.epochs, "seed": plan.seed,
              **{f"set.{k}": v for k, v in plan.overrides.items()}}
    run_id = report_parent_run(tracking_uri, EXPERIMENT, plan.tag, params, state.data.get("mlflow", {}))
    if state.data.get("mlflow") != {"tracking_uri": tracking_uri, "parent_run_id": run_id}:
        state.data["mlflow"] = {"tracking_uri": tracking_uri, "parent_run_id": run_id}
        state.save()
    return run_id


def fmt_shots(s: dict[str, Any]) -> str:
    return "  ".join(f"{k} {fmt(s.get(k))}" for k in SHOTS)


def fmt(v: Any, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def run_cells(plan: Plan, state: State, cells: list[Cell], tracking_uri: str | None) -> None:
    base = base_config(plan)
    parent = parent_run(state, plan, tracking_uri) if tracking_uri else None
    for i, cell in enumerate(cells, 1):
        head = f"[{i}/{len(cells)}] {cell.key}"
        if cell.key in state.cells:
            print(f"{head}: finished earlier, skipped ({fmt_shots(state.cells[cell.key]['final'])})", flush=True)
            continue
        print(f"{head}: training {cell.method} at IF {cell.imbalance_factor:g}, {plan.epochs} epochs ...", flush=True)
        carry = carry_path(state.path.parent, plan, cell)
        record = train_cell(plan, base, cell, tracking_uri, parent, carry)
        state.cells[cell.key] = record
        state.save()
        record["analysis"] = cell_analysis(carry, cell_config(plan, base, cell))  # the final model, while at hand
        state.save()
        print(f"{head}: done in {record['wall_s']:.0f} s: {fmt_shots(record['final'])}", flush=True)


# --------------------------------------------------------------------------- analyses (Sections 4.4-4.6)


@torch.no_grad()
def test_set_outputs(checkpoint: str, cfg: TrainConfig, batch_size: int = 500):
    """The checkpoint's model on the balanced test set of cfg: (features, logits, labels, class_counts, taps)."""
    from mbib.checkpoint import model_from_checkpoint
    from mbib.data import normalize
    from mbib.train.engine import load_data

    model, _ = model_from_checkpoint(checkpoint)
    data = load_data(cfg)
    feats: dict[str, list[torch.Tensor]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(data.y_test), batch_size):
        x = normalize(data.x_test[start:start + batch_size], data.mean, data.std)
        for store, out in ((feats, model.features(x)), (logits, model(x))):
            for k, v in out.items():
                store.setdefault(k, []).append(v.float())
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return cat(feats), cat(logits), data.y_test, list(data.class_counts), model.tap_keys


def cell_analysis(checkpoint: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """Everything the report needs from a cell's final model, computed once when the cell ends and kept in the
    state: per head (each tap, z and their mean "f+g", the prediction) its accuracy and the share of predictions
    on each shot group; rho (Table 5, Eq. 15-17) of the final observation v and of z; the mean positive
    posterior per class of the prediction (Appendix D, Eq. 14)."""
    from mbib.metrics import grouped_representation_ratio, mean_positive_posterior, prediction_share, shot_groups
    from mbib.models import ensemble_logits

    feats, logits, labels, counts, tap_keys = test_set_outputs(str(checkpoint), cfg)
    heads = {**logits, "f+g": ensemble_logits(logits)}
    out: dict[str, Any] = {"heads": {h: {"acc": 100.0 * (v.argmax(1) == labels).float().mean().item(),
                                         "share": prediction_share(v, counts)} for h, v in heads.items()},
                           "balanced_share": {g: 100.0 * m.float().mean().item() for g, m in shot_groups(counts).items()}}
    wanted = {"v": tap_keys[-1]} if tap_keys else {}
    if "z" in feats:
        wanted["z"] = "z"
    out["rho"] = {name: {g: r["rho"] for g, r in grouped_representation_ratio(feats[key], labels, counts).items()}
                  for name, key in wanted.items()}
    out["posterior"] = mean_positive_posterior(heads["f+g"].softmax(dim=1), labels, len(counts)).tolist()
    return out


def run_analyses(plan: Plan, state: State) -> None:
    """Analyse every finished cell that lacks its analysis and whose final checkpoint is at hand."""
    base = base_config(plan)
    for cell in plan_cells(plan):
        record = state.cells.get(cell.key)
        if record is None or "analysis" in record:
            continue
        final = carry_path(state.path.parent, plan, cell)
        if not final.is_file():
            print(f"analysis of {cell.key}: its final checkpoint {final} is gone; retrain the cell by deleting it "
                  f"from {state.path}", flush=True)
            continue
        print(f"analysis of {cell.key} on the test set ...", flush=True)
        record["analysis"] = cell_analysis(final, cell_config(plan, base, cell))
        state.save()


# --------------------------------------------------------------------------- report


def paper_number(plan: Plan, method: str, imbalance_factor: float) -> float | None:
    if plan.dataset not in PAPER_DATASETS:
        return None
    return PAPER_TABLE1.get(method, {}).get(imbalance_factor)


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
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
            "observation (GAP'd last stage), z the bottleneck. Computed on the kept (best-accuracy) checkpoint.", "",
            *_table(["Features", "Many", "Medium", "Few", "All", "Paper (many / medium / few / all)"], rows)]


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
            *_table(["Method", "Mean over classes", "Head third", "Tail third"], rows)]


def _mean(v: Sequence[float | None]) -> float:
    vals = [x for x in v if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


def beta_section(plan: Plan, state: State, out_dir: Path) -> list[str]:
    rows, series = [], {}
    for m in ("bib", "mbib"):
        vals = [state.cells.get(beta_cell(m, b).key, {}).get("final", {}).get("overall") for b in BETAS]
        series[m] = vals
        rows.append([m.upper(), *(fmt(v) for v in vals)])
    lines = [*_table(["Method", *(f"β={b:g}" for b in BETAS)], rows), "",
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
    return [*_table(["Observations", "Overall", "Paper (Table 4)", "Δ"], rows), "",
            "IF 100; a = 0 for 2-MBIB, a = b = 0.3 otherwise (Table 4's setting). 4-MBIB(x) adds BIB(x, z) on the",
            "input image's GAP (model.input_tap) as the shallowest observation, with weight a."]


def write_report(plan: Plan, state: State, path: Path) -> Path:
    base = apply_overrides(base_config(plan), plan.overrides)
    o = base.optim
    factors = ", ×".join(f"{x:g}" for x in o.milestone_factors)
    settings_line = (f"ResNet-32, batch {o.batch_size}, SGD lr {o.lr} momentum {o.momentum} wd {o.weight_decay}, "
                     f"warm-up {o.warmup_epochs:g} epochs, lr ×{factors} at epochs "
                     f"{', '.join(map(str, o.milestones))}, "
                     f"LDAM-DRW re-weighting from epoch {base.loss.drw_epoch} "
                     "(all scaled from the paper's 200-epoch schedule)")
    overrides = ", ".join(f"`{k}={v}`" for k, v in sorted(plan.overrides.items())) or "none"
    recs = [state.cells[c.key] for c in plan_cells(plan) if c.key in state.cells]
    paper_note = ("Paper = Table 1 (CIFAR-100-LT, 200 epochs), which publishes overall accuracy only; for GML the "
                  "number is GML's own publication." if plan.dataset in PAPER_DATASETS else
                  f"Paper: n/a: the paper publishes no {plan.dataset} numbers; the CIFAR-100-LT numbers of Table 1 "
                  "are listed in `mbib.reproduce.PAPER_TABLE1`.")
    lines = [f"# Reproduction: {plan.dataset}, {plan.epochs} epochs", "",
             f"Generated by `bench/reproduce.py` on {datetime.date.today().isoformat()}. Command of the last run:", "",
             f"    {state.data['commands'][-1] if state.data['commands'] else ''}", "",
             f"- Data set: `{plan.dataset}`; seed {plan.seed}; {plan.epochs} epochs (the paper trains {PAPER_EPOCHS}).",
             f"- Schedule: {settings_line}.",
             f"- Extra settings (`--set`): {overrides}. GML rows use strong augmentation (AutoAugment + Cutout), "
             "as GML publishes; every other method uses crop + flip.",
             f"- Cells finished: {len(recs)}; total training wall time {sum(r['wall_s'] for r in recs) / 60:.1f} min.",
             *(f"- Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, "
               f"device {m['device']}." for m in state.data["machines"]),
             *mlflow_lines(state), *data_caveat(plan),
             "", "## Table 1: top-1 accuracy (%)", "",
             "Ours = the last epoch's evaluation on the balanced test set; many > 100, medium 20-100, few < 20 "
             f"training images a class; Δ = ours − paper (overall). {paper_note} \"Best\" is the best evaluation "
             "during training (selected on the test set, so optimistic).", "",
             *_table(["Method", "IF", "Overall", "Many", "Medium", "Few", "Paper", "Δ", "Best (epoch)",
                      "Seed (commit)", "Wall (s)"], grid_rows(plan, state)), ""]
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
    return f"{cell.key} ({int(state['epoch']) + 1} of {plan.epochs} epochs done)"


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
            *_table(["Cell", "Accuracy by head", "Predictions on many-shot classes (%)", "Balanced (%)"], rows)]


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


# --------------------------------------------------------------------------- command line


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
    p.add_argument("--verbose", action="store_true", help="show Ray's worker logs, not only the progress bar")
    args = p.parse_args(argv)
    from mbib.console import set_verbose
    from mbib.gml import register_gml_methods

    set_verbose(args.verbose)
    from mbib.losses import METHODS

    register_gml_methods()
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
    overrides = parse_sets(args.overrides)
    plan = Plan(args.dataset, args.epochs, args.seed, methods, ifs, overrides, args.rho, args.posterior,
                args.beta_ablation, args.taps_ablation, args.appendix_j, args.runner)
    apply_overrides(base_config(plan), overrides)  # a bad --set fails now, not after hours of training
    return plan, args


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plan, args = parse_args(argv)
        out = Path(args.out)
        report = out / f"{plan.tag}.md"
        state = State(out / f"{plan.tag}.state.json", plan.settings())
        state.note_invocation("python bench/reproduce.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                              machine_info())
        from mbib import tracking

        uri = tracking.tracking_uri(args.tracking_uri) if plan.runner == "ray" else None  # plain: no MLflow
        try:
            run_cells(plan, state, plan_cells(plan), uri)
            run_analyses(plan, state)
        finally:  # an interrupted grid still leaves a report of what finished
            write_report(plan, state, report)
        if uri:
            log_report(state, report, uri)
        summary(plan, state, report)
        print(f"open MLflow with: {tracking.ui_command(uri)}")
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def log_report(state: State, report: Path, uri: str) -> None:
    """The report and its PNGs as artifacts of the parent run."""
    from mbib.tracking.runs import log_report as log_files

    parent = state.data.get("mlflow", {}).get("parent_run_id")
    if parent:
        log_files(uri, parent, [report, *report.parent.glob(f"{report.stem}-*.png")])

