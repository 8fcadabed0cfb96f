"""The epoch loop, free of Ray: train, evaluate every `eval_every` epochs, hand each report to a callback.

Ray Train's worker function (mbib.train.loop) and the plain single-process runner (mbib.train.plain, for
machines without Ray, e.g. a lent GPU) both drive an Engine through `fit`, so a run trains the same either way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mbib.checkpoint import check_compatible, describe, load_weights
from mbib.data.split import SELECT_METRIC
from mbib.train.engine import Engine, precision_label

# report(metrics, checkpoint state or None): an evaluated epoch comes with the state to checkpoint
Report = Callable[[dict[str, Any], dict[str, Any] | None], None]
# the checkpoint epoch's report (JSON), sent again with the first report after a restore: a driver killed after
# the checkpoint and before its tracker logged that epoch would otherwise lose the record for good
CHECKPOINT_REPORT = "checkpoint_report"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection test hook to simulate a crashed worker."""


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best accuracy so far, training seconds spent (all machines)."""

    start_epoch: int = 0
    best: float = -1.0
    elapsed: float = 0.0
    best_metrics: dict[str, Any] = field(default_factory=dict)  # the report of the best evaluation
    restored_report: dict[str, Any] = field(default_factory=dict)  # the checkpoint epoch's report (restored runs)
    legs: list[dict[str, Any]] = field(default_factory=list)  # the epochs each earlier leg trained, and on what


def add_leg(legs: list[dict[str, Any]], first: int, last: int, device: str) -> list[dict[str, Any]]:
    """The legs with epochs first..last (1-based) on `device` added; a leg continuing the previous one on the same
    device and precision extends it, so a run resumed on its own machine stays one leg."""
    if legs and legs[-1]["device"] == device and legs[-1]["last"] + 1 == first:
        return [*legs[:-1], {**legs[-1], "last": last}]
    return [*legs, {"first": first, "last": last, "device": device}]


def restore(engine: Engine, state: dict[str, Any] | None, where: str | None = None) -> Progress:
    """Load a checkpoint's state into the engine (None: a fresh run) and say where to continue. A checkpoint
    made for another model or data set is refused in one line naming both sides (`where`: its origin)."""
    if state is None:
        return Progress()
    where = where or "checkpoint"
    dataset = engine.cfg.data.dataset
    check_compatible(state, engine.spec, dataset, where, engine.cfg.data.recompress)
    load_weights(engine, state, state, f"a {engine.cfg.loss.method} run of {describe(engine.spec, dataset)}", where)
    start = int(state["epoch"]) + 1
    # checkpoints older than the legs record say nothing of where their epochs ran
    legs = state.get("legs") or [{"first": 1, "last": start, "device": "not recorded"}]
    return Progress(start, float(state.get("best_acc", -1.0)), float(state.get("elapsed_s", 0.0)),
                    dict(state.get("best_metrics", {})),
                    {k: v for k, v in state.get("metrics", {}).items() if k != CHECKPOINT_REPORT}, list(legs))


def fit(engine: Engine, progress: Progress, report: Report, inject_fault: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Train the remaining epochs. `inject_fault` raises InjectedFault after runtime.inject_failure_epoch's
    report (the test hook of the fault-tolerance tests)."""
    cfg = engine.cfg
    epochs, since = cfg.optim.epochs, time.perf_counter()
    device = precision_label(engine.opts)
    noted = False  # inject_hang: whether this process has passed its first checkpoint
    for epoch in range(progress.start_epoch, epochs):
        # started_at_epoch: where this process began (0: from scratch), so a record shows a run continued, not redone
        metrics = {"epoch": epoch, "started_at_epoch": progress.start_epoch, **engine.run_epoch(epoch),
                   "lr": engine.optimizer.param_groups[0]["lr"], "param_checksum": engine.param_checksum()}
        if epoch == progress.start_epoch and progress.restored_report:
            metrics[CHECKPOINT_REPORT] = json.dumps(progress.restored_report)
        state = None
        if (epoch + 1) % cfg.runtime.eval_every == 0 or epoch + 1 == epochs:
            result = engine.evaluate()
            metrics.update(result.metrics(), elapsed_s=progress.elapsed + time.perf_counter() - since)
            score = result.split[SELECT_METRIC]  # the best epoch is chosen on the selection split, never the held-out one
            if score > progress.best:
                progress.best, progress.best_metrics = score, dict(metrics)
            metrics["best_acc"] = progress.best  # the best selection score so far
            state = {**engine.state_dict(), "epoch": epoch, "best_acc": progress.best, "metrics": metrics,
                     "best_metrics": progress.best_metrics, "confusion": result.confusion,
                     "elapsed_s": metrics["elapsed_s"],
                     "legs": add_leg(progress.legs, progress.start_epoch + 1, epoch + 1, device)}
        report(metrics, state)
        if on_epoch is not None:
            on_epoch(metrics)
        if inject_fault and cfg.runtime.inject_failure_epoch == epoch:
            raise InjectedFault(f"injected fault after epoch {epoch}")
        if state is not None and cfg.runtime.inject_hang and not noted:
            noted = True
            hang_if_nth(cfg.runtime.inject_hang)


def hang_if_nth(spec: str, timeout_s: float = 600.0) -> None:
    """runtime.inject_hang DIR:N: note this process in DIR; the N-th to arrive waits (at most `timeout_s`) so a
    test can kill a run that is certainly part-way, with a checkpoint behind it, whatever the machine's speed."""
    folder, _, count = spec.rpartition(":")
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, f"{time.time_ns()}-{os.getpid()}").touch()
    if len(list(Path(folder).iterdir())) == int(count):
        time.sleep(timeout_s)
