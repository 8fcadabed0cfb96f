"""What a person sees in the terminal: quiet by default, Ray's own output only on request (a study's live table of
trials is in mbib.study.console).

Quiet (the default): Ray's worker and actor logs are dropped on the driver except the training progress bar, Tune's
status boxes are off, and a study shows one row per trial, updated in place. `--verbose` brings Ray's output back,
minus known-harmless noise (Train's placement-group cleaner losing the GCS while another Ray shares the machine).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

_state = {"verbose": False}
GROUPS = ("many", "medium", "few")
# (source part, line part): worker-log batches that are harmless; the source is the actor's name or "raylet"
NOISE = (("PlacementGroupCleaner", "GCS"), ("PlacementGroupCleaner", "Traceback"),
         ("PlacementGroupCleaner", "Exception in thread"), ("raylet", "worker processes have been started"))


def set_verbose(verbose: bool) -> None:
    """Choose quiet or verbose output for this process (before Ray starts)."""
    _state["verbose"] = bool(verbose)
    if verbose:
        return
    # Tune's console output: the legacy reporter at verbose=0 prints nothing; the new one still prints its boxes
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
    for name in ("ray", "mlflow"):  # warnings that matter surface as our one-line errors instead
        logging.getLogger(name).setLevel(logging.ERROR if name == "ray" else logging.WARNING)
    # a failed trial's traceback: StudyConsole prints one line and where the whole trace is
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    try:
        import optuna
    except ImportError:  # absent where only the plain runner runs (a lent GPU with its own torch)
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"


def verbose() -> bool:
    return _state["verbose"]


def tune_verbosity() -> int:
    """RunConfig(verbose=...): Tune's own status boxes only in verbose mode."""
    return 2 if verbose() else 0


def error_line(text: str) -> str:
    """One line out of a trial's error trace: the out-of-memory kill, else the last `SomethingError: ...` line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any("low on memory" in line for line in lines):
        return "out of memory: Ray killed the trial's worker (run fewer trials at once: --max-concurrent)"
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b.*:", line)]
    return (errors or lines or ["unknown error"])[-1][:300]


def fmt(value: Any, digits: int = 1) -> str:
    """A metric for people: 'n/a' for a missing value or an empty shot group (NaN)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def eta(seconds_so_far: float, epochs_done: int, epochs_left: int) -> str:
    """Time left at this leg's mean epoch time: '45 s', '12 min', '3.4 h'; '?' before an epoch has run."""
    if epochs_done <= 0:
        return "?"
    left = seconds_so_far / epochs_done * max(0, epochs_left)
    if left < 90:
        return f"{left:.0f} s"
    return f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"


def leg_eta(start: float, first_end: float, now: float, epochs_done: int, epochs_left: int) -> str:
    """Time left in a leg: its first epoch pays one-off costs (warm-up, a neighbour lane's start; 5x a steady epoch
    seen on a CPU), so the pace comes from the epochs after it once there are any."""
    if epochs_done >= 2:
        return eta(now - first_end, epochs_done - 1, epochs_left)
    return eta(now - start, epochs_done, epochs_left)


def shown_lines(source: str, lines: list[str]) -> list[str]:
    """The lines of one worker-log batch that reach the terminal: progress bars and the raylet's messages (out of
    memory, ...) always, the rest only when verbose; known noise never.

    A noise batch is dropped whole: a traceback is several lines, only one of which names the cause.
    """
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    if any(a in source and part in line for line in lines for a, part in NOISE):
        return []
    if verbose() or source == "raylet":
        return lines
    return [line for line in lines if RAY_TQDM_MAGIC in line]


def filter_worker_logs() -> None:
    """Put shown_lines in front of Ray's driver-side log printer; call before ray.init, which binds the printer.

    Ray has no public hook for this; if its internals move, worker logs stay as Ray prints them.
    """
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "mbib_filtered", False):
        return

    def filtered(data: dict, *args, **kwargs) -> None:
        source = str(data.get("actor_name") or data.get("task_name") or data.get("pid") or "")
        lines = shown_lines(source, data.get("lines", []))
        if lines:
            printer(dict(data, lines=lines), *args, **kwargs)

    filtered.mbib_filtered = True
    ray_worker.print_to_stdstream = filtered
