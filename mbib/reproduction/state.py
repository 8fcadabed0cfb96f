"""The reproduction's JSON state: finished cells with their analyses, machines and commands; written atomically.

Several processes may share one state (`bench/reproduce.py --jobs N`): each save merges this process's cells into
what is on disk under a file lock, and a cell is trained by the one process that holds its claim (a lock on a file
beside its checkpoint, which the kernel releases when that process ends, however it ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterator

import torch

from mbib.errors import ConfigError


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
        self._base = _snapshot(self.data["cells"])  # the cells as last read: what differs from it, this process wrote

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def note_invocation(self, command: str, machine: dict[str, Any]) -> None:
        if machine not in self.data["machines"]:
            self.data["machines"].append(machine)
        self.data["commands"].append(command)
        self.save()

    def refresh(self) -> None:
        """Take in the cells other processes finished since this one read the file."""
        with self._locked():
            self._merge_disk()

    def save(self) -> None:
        with self._locked():
            self._merge_disk()
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_json_safe(self.data), indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def _merge_disk(self) -> None:
        """Cells, machines and commands on disk that this process lacks join its own (its own records win)."""
        if self.path.is_file():
            disk = json.loads(self.path.read_text())
            written = {k: v for k, v in self.data["cells"].items() if _json_safe(v) != self._base.get(k)}
            self.data["cells"] = {**disk.get("cells", {}), **written}
            for key in ("machines", "commands"):
                self.data[key] = self.data[key] + [x for x in disk.get(key, []) if x not in self.data[key]]
            for key, value in disk.items():
                self.data.setdefault(key, value)  # e.g. a hand-written in_progress note
        self._base = _snapshot(self.data["cells"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


@contextlib.contextmanager
def cell_claim(checkpoint: Path) -> Iterator[bool]:
    """True while this process alone may train the cell whose checkpoint this is; False when another holds it."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with open(checkpoint.with_name(checkpoint.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _snapshot(cells: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(_json_safe(cells)))


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
                              cwd=Path(__file__).parents[1]).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def device_label(cuda_name: str | None, cpu_capability: str, native_bf16: bool) -> str:
    """The device a cell trained on; a CPU's says whether it trains in bf16 (mbib.train.engine), since a cell
    continued on another CPU may mix precisions and its report should show it."""
    if cuda_name:
        return f"cuda ({cuda_name})"
    return f"cpu ({cpu_capability}, {'native bf16: trains in bf16' if native_bf16 else 'no native bf16: trains in fp32'})"


def machine_info() -> dict[str, Any]:
    from mbib.train.engine import cpu_has_native_bf16  # reproduction sits above train; imported late, as it pulls in the engine
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = device_label(cuda, torch.backends.cpu.get_cpu_capability(), cpu_has_native_bf16())
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "device": device}
