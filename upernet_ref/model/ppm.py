"""Pyramid Pooling Module (Zhao et al., PSPNet, CVPR 2017; UPerNet section 3.1).

UPerNet puts a PPM on top of the last backbone stage C5 so that the top of the feature pyramid
sees the whole image: C5 is average-pooled to 1x1, 2x2, 3x3 and 6x6 grids, each pooled map is
projected to `channels` by a 1x1 conv + BN + ReLU and bilinearly upsampled back to C5's size,
and [C5, the four branches] are fused by a 3x3 conv + BN + ReLU (the "bottleneck").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref.model.layers import ConvBNReLU, resize


class PyramidPooling(nn.Module):
    """PPM: `branches.K` project the K-th pooled map; `bottleneck` fuses [x, branches]."""

    def __init__(self, in_channels: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList(ConvBNReLU(in_channels, channels, 1) for _ in pool_scales)
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]  # C5: (B, 2048, h, w)
        outs = [x]
        for scale, branch in zip(self.pool_scales, self.branches):
            pooled = F.adaptive_avg_pool2d(x, scale)  # (B, 2048, s, s)
            outs.append(resize(branch(pooled), size))  # (B, 512, h, w)
        return self.bottleneck(torch.cat(outs, dim=1))  # (B, 4096, h, w) -> (B, 512, h, w)
