"""Backbone protocol: a stem plus residual stages, read out as GAP'd features at chosen block outputs.

Tap rule (shared by every backbone; `select_taps` is the single source of truth):
  A tap is the output of one residual block, named (stage index, block index). Candidates are ranked
    1. the ends of the last three stages, deepest first   (the paper's v3, v2, v1 = CNN3, CNN2, CNN1);
    2. the middle block of each stage that has >= 2 blocks, deepest stage first
       (middle = the output after ceil(B/2) of its B blocks, e.g. block 3 of 5 in ResNet-32);
    3. the ends of any earlier stages, deepest first (only ResNet-18/50-style 4-stage nets have one).
  `num_taps` = n keeps the first n candidates and orders them shallow -> deep, so
    n=2: last two stage ends; n=3 (default): last three stage ends;
    n=4..6 on ResNet-32: adds mid-stage-3, then mid-stage-2, then mid-stage-1 (Table 4's 4/5/6-MBIB).
  A backbone with too few candidates (ResNet-10 has one block per stage, so at most 4) raises ConfigError.
  `input_tap=True` prepends the GAP of the input image itself (Table 4's "4-MBIB(x)", BIB(x, z)).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from mbib.errors import ConfigError

Tap = tuple[int, int]  # (stage index, block index within the stage)

MIN_TAPS, MAX_TAPS = 2, 6


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling to [B, C]; flatten rather than view so channels_last tensors work."""
    return torch.flatten(x.mean(dim=(2, 3)), 1)


def select_taps(blocks_per_stage: list[int], num_taps: int) -> list[Tap]:
    """The `num_taps` tap points for a net with these stage depths, shallow -> deep (see module docstring)."""
    if not isinstance(num_taps, int) or not MIN_TAPS <= num_taps <= MAX_TAPS:
        raise ConfigError(f"num_taps={num_taps} is out of range; use an integer from {MIN_TAPS} to {MAX_TAPS}")
    n_stages = len(blocks_per_stage)
    ends = [(s, blocks_per_stage[s] - 1) for s in reversed(range(n_stages))]
    mids = [(s, math.ceil(b / 2) - 1) for s, b in reversed(list(enumerate(blocks_per_stage))) if b >= 2]
    candidates = ends[:3] + mids + ends[3:]
    if num_taps > len(candidates):
        raise ConfigError(
            f"num_taps={num_taps} exceeds the {len(candidates)} tap points this backbone has; "
            f"use num_taps <= {len(candidates)}"
        )
    return sorted(candidates[:num_taps])


class Backbone(Protocol):
    """What TappedNet needs from a feature extractor."""

    tap_channels: list[int]  # feature width of each tap, shallow -> deep

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:  # GAP'd [B, C_i] per tap, shallow -> deep
        ...


class StagedBackbone(nn.Module):
    """Runs stem then stages block by block, returning GAP'd features at the selected taps.

    `stage_channels[s]` is the output width of every block in stage s.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[nn.Sequential],
        stage_channels: list[int],
        num_taps: int = 3,
        input_tap: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.taps = select_taps([len(s) for s in stages], num_taps)
        self.input_tap = input_tap
        self.tap_channels = ([in_channels] if input_tap else []) + [stage_channels[s] for s, _ in self.taps]
        self._tap_set = set(self.taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [gap(x)] if self.input_tap else []
        h = self.stem(x)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                h = block(h)
                if (s, b) in self._tap_set:
                    feats.append(gap(h))
        return feats
