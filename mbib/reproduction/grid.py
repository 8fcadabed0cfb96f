"""The reproduction's cells (a method at an IF, or an ablation setting) and the config each trains with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbib.config import TrainConfig, apply_overrides, resolve_config
from mbib.methods import method_defaults, method_recipe


EXPERIMENT = "reproduction"
DEFAULT_METHODS = ("ce", "focal", "bsce", "ldam-drw", "bib", "mbib", "gml", "mbib-gml")
DEFAULT_IFS = (100.0, 50.0, 10.0)
PAPER_EPOCHS = 200
ORDER_CHAIN = ("ce", "bsce", "bib", "mbib")  # the ordering Table 1 shows: CE < BSCE < BIB < MBIB
RHO_METHODS = ("bsce", "bib", "mbib")
POSTERIOR_METHODS = ("ce", "bsce", "bib", "mbib")
BETAS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
TAPS = (2, 3, 4, 5, 6, "4x")
ANALYSIS_IF = 100.0  # Table 4, Table 5 and Figure 3 are at IF 100
# may differ between legs of one grid: where files go, what is shown, how many threads, compiled or not
NON_RESULT_KEYS = ("runtime.storage_path", "runtime.show_progress", "runtime.cpus_per_worker", "runtime.compile",
                   "runtime.inject_failure_epoch", "runtime.inject_hang")  # test hooks: a later leg continues the cell


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
                tuple(sorted(method_recipe(method).items())))  # e.g. GML's strong augmentation


def beta_cell(method: str, beta: float) -> Cell:
    if beta == method_defaults(method)["beta"]:
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
