"""What a person sees in the terminal: one live table of trials, short summaries, and Ray's own output only on request.

Quiet (the default): Ray's worker and actor logs are dropped on the driver except the training progress bar, Tune's
status boxes are off, and a study shows one row per trial, updated in place. `--verbose` brings Ray's output back,
minus known-harmless noise (Train's placement-group cleaner losing the GCS while another Ray shares the machine).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

_state = {"verbose": False}
GROUPS = ("many", "medium", "few")
# (actor name part, line part): worker-log batches that are harmless and would otherwise print as tracebacks
NOISE = (("PlacementGroupCleaner", "GCS"), ("PlacementGroupCleaner", "Traceback"),
         ("PlacementGroupCleaner", "Exception in thread"))


def set_verbose(verbose: bool) -> None:
    """Choose quiet or verbose output for this process (before Ray starts)."""
    _state["verbose"] = bool(verbose)
    if not verbose:  # Ray's Python loggers: warnings that matter surface as our one-line errors instead
        logging.getLogger("ray").setLevel(logging.ERROR)


def verbose() -> bool:
    return _state["verbose"]


def tune_verbosity() -> int:
    """RunConfig(verbose=...): Tune's own status boxes only in verbose mode."""
    return 2 if verbose() else 0


def fmt(value: Any, digits: int = 1) -> str:
    """A metric for people: 'n/a' for a missing value or an empty shot group (NaN)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def shown_lines(actor: str, lines: list[str]) -> list[str]:
    """The lines of one worker-log batch that reach the terminal: progress bars always, the rest only when verbose.

    A noise batch is dropped whole: a traceback is several lines, only one of which names the cause.
    """
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    if not verbose():
        return [line for line in lines if RAY_TQDM_MAGIC in line]
    if any(a in actor and part in line for line in lines for a, part in NOISE):
        return []
    return lines


def filter_worker_logs() -> None:
    """Put shown_lines in front of Ray's driver-side log printer (call right after ray.init(log_to_driver=True)).

    Ray has no public hook for this; if its internals move, worker logs stay as Ray prints them.
    """
    from ray._private import worker as ray_worker

    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    printer = getattr(dispatcher, "handlers", {}).get("ray_print_logs")
    if printer is None:
        return

    def filtered(data: dict) -> None:
        lines = shown_lines(str(data.get("actor_name") or data.get("task_name") or ""), data.get("lines", []))
        if lines:
            printer(dict(data, lines=lines))

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


# ---------------------------------------------------------------- studies

def _trial_label(trial_id: str) -> str:
    """Tune's trial ids end in _00003: show 'trial 4'."""
    tail = trial_id.rsplit("_", 1)[-1]
    return f"{int(tail) + 1}" if tail.isdigit() else trial_id


class StudyConsole(Callback):
    """A Tune callback (driver side): one live row per trial of a data set, left on screen when it ends."""

    def __init__(self, dataset_key: str, max_epochs: int, params: tuple[str, ...]):
        self.key, self.max_epochs, self.params = dataset_key, max_epochs, params
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Live | None = None
        self.start = time.monotonic()

    def __getstate__(self):  # Tune pickles callbacks into its experiment state: the live display stays here
        return {**self.__dict__, "live": None}

    def _table(self) -> Table:
        minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
        t = Table(title=f"{self.key}: {len(self.rows)} trials, {minutes}:{seconds:02d} elapsed", title_justify="left")
        for col in ("trial", "state", "epoch", "acc", "best", *GROUPS, *self.params):
            t.add_column(col, justify="left" if col in ("trial", "state") else "right")
        for tid, r in sorted(self.rows.items(), key=lambda kv: kv[1]["order"]):
            t.add_row(_trial_label(tid), r["state"], f"{r['epoch']}/{self.max_epochs}", fmt(r.get("acc")),
                      fmt(r.get("best")), *(fmt(r.get(g)) for g in GROUPS),
                      *(fmt(r["params"].get(p), 2) for p in self.params))
        return t

    def _refresh(self) -> None:
        if self.live is None:
            self.live = Live(self._table(), console=Console(), auto_refresh=False)
            self.live.start()
        self.live.update(self._table(), refresh=True)

    def _row(self, trial) -> dict[str, Any]:
        return self.rows.setdefault(trial.trial_id, {"order": len(self.rows), "state": "pending", "epoch": 0,
                                                     "params": {p: trial.config.get(p) for p in self.params}})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "running"
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["epoch"] = int(result.get("epochs_done", row["epoch"]))
        if "acc" in result:
            row.update({k: result.get(k) for k in ("acc", *GROUPS)})
            row["best"] = max(row.get("best") or -1.0, float(result["acc"]))
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "done" if row["epoch"] >= self.max_epochs else "stopped (ASHA)"
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "failed"
        self._refresh()

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.stop()
            self.live = None


def study_callbacks(dataset_key: str, max_epochs: int, params) -> list:
    """The study's console as Tune callbacks: the live table when quiet, nothing (Tune's own output) when verbose."""
    return [] if verbose() else [StudyConsole(dataset_key, max_epochs, tuple(params))]


def print_study_summary(outcomes: list, uri: str, ui_command: str, seconds: float | None = None) -> None:
    """Per data set: trials run, the best full-budget trial's accuracy (overall and per shot group), its model."""
    console = Console()
    t = Table(title="study summary" + (f" ({seconds / 60:.1f} min)" if seconds is not None else ""), title_justify="left")
    for col in ("data set", "trials", "stopped early", "best acc", *GROUPS, "best trial's settings", "registered model"):
        t.add_column(col, justify="right" if col in ("trials", "stopped early", "best acc", *GROUPS) else "left")
    for o in outcomes:
        b = o.best
        stopped = str(sum(r.state == "PRUNED" for r in o.rows))
        if b is None:
            t.add_row(o.key, str(len(o.rows)), stopped, "n/a", "n/a", "n/a", "n/a", "no successful trial", "")
            continue
        t.add_row(o.key, str(len(o.rows)), stopped, fmt(b.acc), *(fmt(b.metrics.get(g)) for g in GROUPS),
                  " ".join(f"{k}={v:.2g}" for k, v in b.params.items()), f"models:/{o.model_name}/{o.model_version}")
    console.print(t)
    console.print(f"MLflow store: {uri}")
    console.print(f"open it with: [bold]{ui_command}[/bold]", soft_wrap=True)
