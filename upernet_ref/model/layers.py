"""The two building blocks every part of the network shares.

`ConvBNReLU` is the head's only layer type (PPM branches and bottleneck, FPN laterals and
smoothing convs, fusion, the auxiliary head): mmsegmentation's `ConvModule`, whose submodule names
`conv` / `bn` the published checkpoints use. `resize` is the one resampling convention of the
model: bilinear with `align_corners=False`, as in the published code (docs/SPEC.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """conv (bias-free) -> BatchNorm -> ReLU; submodules `conv` and `bn` (mmseg's ConvModule)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with align_corners=False, the convention throughout this model."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
