"""The UPerNet decode head: FPN over [C2, C3, C4, PPM(C5)] and fusion (Xiao et al. 2018, fig. 3).

Feature Pyramid Network (Lin et al. 2017) top-down pathway: each lower level gets a 1x1
"lateral" projection to `channels`, and, going from the top (PPM output) down, every level adds
the bilinearly upsampled level above. A 3x3 conv smooths each merged lower level. UPerNet then
upsamples all four levels to 1/4 of the input, concatenates them and fuses them with a 3x3 conv
(section 3.1: "fused feature map"), before a dropout and a 1x1 classifier.

The FCN auxiliary head on C4 (training only; PSPNet's deep supervision) is `FCNHead`.
"""
from __future__ import annotations

import torch
from torch import nn

from upernet_ref.model.layers import ConvBNReLU, resize
from upernet_ref.model.ppm import PyramidPooling


class UPerHead(nn.Module):
    """PPM + FPN + fusion + classifier.

    Args:
        in_channels: channels of [C2, C3, C4, C5], e.g. (256, 512, 1024, 2048).
        channels: width of every head conv (512 as published).
        num_classes: output classes.
    """

    def __init__(self, in_channels: list[int] | tuple[int, ...], channels: int = 512,
                 num_classes: int = 150, pool_scales: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def fpn_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The four pyramid levels after the top-down pathway and FPN convs, finest first."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.ppm(features[-1]))  # top of the pyramid: (B, 512, H/8, W/8) at os8
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context flows to fine levels
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        return outs

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outs = self.fpn_features(features)
        size = outs[0].shape[-2:]  # 1/4 of the input
        fused = self.fuse(torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))  # (B, num_classes, H/4, W/4)


class FCNHead(nn.Module):
    """Auxiliary head on C4: conv3x3 + BN + ReLU, dropout, conv1x1 classifier."""

    def __init__(self, in_channels: int, channels: int = 512, num_classes: int = 150,
                 dropout: float = 0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))
