"""ResNet-32 for 32x32 inputs, the CIFAR backbone of Cao et al. 2019 (LDAM-DRW) used in the paper's Sec. 4.2.

Layout: 3x3 conv(3->16) + BN + ReLU, then 3 stages of 5 BasicBlocks with 16/32/64 channels (stride 1/2/2),
option-A shortcuts (parameter-free: subsample by stride 2 and zero-pad the new channels), kaiming-normal init
of every conv. Backbone parameters: 463,504 (+ FC 64->100 = 470,004, the usual "0.47M ResNet-32").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mbib.models.backbone import StagedBackbone

CIFAR_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 5  # ResNet-32: 6n+2 layers with n=5


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad channels on both sides; no parameters."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        extra = out_planes - in_planes
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad pads dims from the last backwards: (W, W, H, H, C, C)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(in_planes, planes) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [CifarBasicBlock(in_planes, planes, stride)]
    layers += [CifarBasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet32_backbone(num_taps: int = 3, input_tap: bool = False, in_channels: int = 3) -> StagedBackbone:
    """ResNet-32 read out at the taps of `select_taps` (default: GAP of stages 1, 2, 3 = v1, v2, v3)."""
    w1, w2, w3 = CIFAR_WIDTHS
    stem = nn.Sequential(nn.Conv2d(in_channels, w1, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
    stages = [
        _stage(w1, w1, BLOCKS_PER_STAGE, 1),
        _stage(w1, w2, BLOCKS_PER_STAGE, 2),
        _stage(w2, w3, BLOCKS_PER_STAGE, 2),
    ]
    net = StagedBackbone(stem, stages, list(CIFAR_WIDTHS), num_taps, input_tap, in_channels)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)  # He init as in the LDAM ResNet-32
    return net
