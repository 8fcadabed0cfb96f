"""A study's console: one live table of trials, updated in place, and the summary when the study ends."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mbib.console import GROUPS, error_line, fmt, verbose
from mbib.study.results import finite
from mbib.study.spec import BUDGET, METRIC


class StudyConsole(Callback):
    """A Tune callback (driver side): one live row per trial of a data set, left on screen when it ends."""

    def __init__(self, dataset_key: str, max_epochs: int, params: tuple[str, ...]):
        self.key, self.max_epochs, self.params = dataset_key, max_epochs, params
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Live | None = None
        self.console: Console | None = None
        self.start = time.monotonic()

    def __getstate__(self):  # Tune pickles callbacks into its experiment state: the display stays here
        return {**self.__dict__, "live": None, "console": None}

    def _table(self) -> Table:
        minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
        shown = "held-out split" if any(r.get("heldout") for r in self.rows.values()) else "whole test set"
        t = Table(title=f"{self.key}: {len(self.rows)} trials, {minutes}:{seconds:02d} elapsed\n"
                        f"sel@ep: best selection-split accuracy so far and its epoch; acc/many/med/few: {shown}, "
                        "that epoch",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), pad_edge=False,
                  collapse_padding=True)  # 80 columns
        for col in ("#", "state", "epoch", "sel@ep", "acc", "many", "med", "few", *self.params):
            t.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
        for r in sorted(self.rows.values(), key=lambda r: r["number"]):
            t.add_row(str(r["number"]), r["state"], f"{r['epoch']}/{self.max_epochs}",
                      f"{fmt(r.get('score'))}@{r['at']}" if "at" in r else "n/a",
                      *(fmt(r.get(g), 0 if g in GROUPS else 1) for g in ("acc", *GROUPS)),
                      *(fmt(r["params"].get(p), 2) for p in self.params))
        return t

    def _refresh(self, finished=None, evaluated=None) -> None:
        """Redraw the table in a terminal; in a log file, a line per evaluation and per finished trial (the table
        comes at the end), so a long study's log shows progress between trials."""
        self.console = self.console or Console()
        if not self.console.is_terminal:
            if finished is not None:
                r = self.rows[finished.trial_id]
                self._say(f"{self.key} trial {r['number']}: {r['state']} at epoch {r['epoch']}/{self.max_epochs}, "
                          f"selection score {fmt(r.get('score'))} at epoch {r.get('at', 'n/a')} "
                          f"({'held-out' if r.get('heldout') else 'whole test set'} acc {fmt(r.get('acc'))})")
            elif evaluated is not None:
                r, score = self.rows[evaluated[0].trial_id], evaluated[1]
                self._say(f"{self.key} trial {r['number']}: epoch {r['epoch']}/{self.max_epochs}, selection score "
                          f"{fmt(score)} (best {fmt(r.get('score'))} at epoch {r.get('at', 'n/a')})")
            return
        if self.live is None:
            self.live = Live(self._table(), console=self.console, auto_refresh=False)
            self.live.start()
        self.live.update(self._table(), refresh=True)

    def _row(self, trial) -> dict[str, Any]:
        if trial.trial_id not in self.rows:
            from mbib.study.results import trial_number  # the number in the trial's folder name, as the summary shows it

            path = getattr(trial, "path", None)
            number = (trial_number(trial.trial_id, path) if path else 0) or len(self.rows) + 1
            self.rows[trial.trial_id] = {"number": number, "state": "pending", "epoch": 0,
                                         "params": {p: trial.config.get(p) for p in self.params}}
            self._resume_row(trial)
        return self.rows[trial.trial_id]

    def _resume_row(self, trial) -> None:
        """A resumed driver's row starts from what the trial reported before (its result.json), not from nothing."""
        from mbib.study.results import rows_so_far

        if not (getattr(trial, "path", None) or getattr(trial, "local_path", None)):
            return
        try:
            before = rows_so_far([trial], self.max_epochs)
        except Exception:  # a half-written or foreign folder: the row starts empty, as it would have
            return
        if before and finite(before[0].score):
            r, row = before[0], self.rows[trial.trial_id]
            held = "heldout_acc" in r.metrics
            row.update(epoch=r.epochs_done, score=r.score, at=r.epoch, heldout=held,
                       **{k: r.metrics.get(f"heldout_{k}" if held else k) for k in ("acc", *GROUPS)})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "running"
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["epoch"] = int(result.get(BUDGET, row["epoch"]))
        score = result.get(METRIC)
        if finite(score) and score >= row.get("score", -1.0):  # a best epoch on the selection split (latest on ties)
            held = "heldout_acc" in result  # what the row shows beside it: the held-out part, else the whole test set
            row.update(score=score, at=row["epoch"], heldout=held,
                       **{k: result.get(f"heldout_{k}" if held else k) for k in ("acc", *GROUPS)})
        self._refresh(evaluated=(trial, score) if finite(score) else None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "done" if row["epoch"] >= self.max_epochs else "stopped"
        self._refresh(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "failed"
        self._refresh()
        self._say(f"{self.key} trial {row['number']} failed: {error_line(str(trial.get_error() or ''))}"
                  + (f" (trace: {trial.error_file})" if trial.error_file else ""))

    def _say(self, line: str) -> None:
        """A line above the live table (or in the log)."""
        (self.live.console if self.live is not None else self.console or Console()).print(line, soft_wrap=True,
                                                                                           highlight=False)

    def on_experiment_end(self, trials, **info):
        if self.live is None:
            (self.console or Console()).print(self._table())
            return
        self.live.update(self._table(), refresh=True)
        self.live.stop()
        self.live = None


def study_callbacks(dataset_key: str, max_epochs: int, params) -> list:
    """The study's console as Tune callbacks: the live table when quiet, nothing (Tune's own output) when verbose."""
    return [] if verbose() else [StudyConsole(dataset_key, max_epochs, tuple(params))]


def print_study_summary(outcomes: list, uri: str, ui_command: str, seconds: float | None = None) -> None:
    """Per data set: trials run, the best trial by selection score, and its chosen epoch's held-out numbers
    (the number to report), each labelled with the split it comes from."""
    for o in outcomes:
        b, stopped = o.best, sum(r.state == "PRUNED" for r in o.rows)
        print(f"{o.key}: {len(o.rows)} trials, {stopped} stopped early by ASHA")
        if b is None:
            print("  no successful trial")
            continue
        selected, reported = o.selection
        print(f"  best: trial {b.number}, chosen at epoch {b.epoch} of {b.epochs_done} by selection score "
              f"{fmt(b.score)}% on {selected}")
        held = "heldout_acc" in b.metrics
        prefix = "heldout_" if held else ""
        groups = ", ".join(f"{g} {fmt(b.metrics.get(prefix + g))}" for g in GROUPS)
        print(f"  report: accuracy {fmt(b.metrics.get(prefix + 'acc'))}% ({groups}) on {reported}"
              + (f"; whole test set {fmt(b.metrics.get('acc'))}%" if held else ""))
        print("  settings: " + " ".join(f"{k}={v:.2g}" for k, v in b.params.items())
              + f"; registered as models:/{o.model_name}/{o.model_version} (epoch {b.epoch})")
    if seconds is not None:
        print(f"study took {seconds / 60:.1f} min")
    print(f"MLflow store: {uri}")
    print(f"open it with: {ui_command}")
