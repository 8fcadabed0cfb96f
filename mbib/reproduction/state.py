"""The reproduction's JSON state: finished cells with their analyses, machines and commands; written atomically."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

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
                              cwd=Path(__file__).parents[1]).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict[str, Any]:
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "device": device}
