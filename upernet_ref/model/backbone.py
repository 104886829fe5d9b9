"""Dilated ResNet backbone (He et al. 2016; dilation as in DeepLab / PSPNet).

UPerNet (Xiao et al. 2018, section 3 and figure 3) reads four feature maps C2..C5 of a ResNet.
The published models use ResNet-50/101 "v1c": a deep stem of three 3x3 convolutions instead of
the 7x7 one, the stride on the 3x3 convolution of each bottleneck, and dilated convolutions in
the last stages so that C4 and C5 stay at 1/8 (output stride 8) or C5 at 1/16 (output stride 16)
of the input instead of 1/16 and 1/32. "Contract dilation": the first block of a dilated stage
uses half the stage's dilation, which keeps the sampling grid dense where the stride is removed.

The plain 7x7 stem is kept for torchvision's ImageNet weights (module names match
`torchvision.models.resnet50`), and BasicBlock ResNet-18/34 variants for small CPU models.
"""
from __future__ import annotations

import torch
from torch import nn

STANDARD_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# output stride -> (stage strides, stage dilations) (docs/SPEC.md, "Architecture")
STRIDES_DILATIONS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Dilation on both, stride on the first."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride and dilation here: "pytorch style"), 1x1 expand x4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3 conv -> BN -> ReLU of the deep stem as three flat modules, not a
    `layers.ConvBNReLU`: the published v1c checkpoints name them `stem.0`, `stem.1`, `stem.3`,
    ... (docs/SPEC.md, "Checkpoint layouts"), which a nested `conv` / `bn` would change."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResNet(nn.Module):
    """ResNet returning the four stage outputs [C2, C3, C4, C5].

    Args:
        depth: 18, 34, 50 or 101 (block type and standard block counts).
        output_stride: 8, 16 or 32; the stride of C5 relative to the input.
        stem: "deep" (v1c, `stem.{0,1,3,4,6,7}`) or "plain" (7x7, `conv1`/`bn1` as torchvision).
        blocks: blocks per stage, overriding the standard count (small variants).
        base_width: width of the first stage (64 for the real networks).
        stem_width: hidden width of the deep stem (32 for v1c).
        contract_dilation: first block of a dilated stage uses dilation / 2.
    """

    def __init__(self, depth: int = 50, output_stride: int = 8, stem: str = "deep",
                 blocks: tuple[int, ...] = (), base_width: int = 64, stem_width: int = 32,
                 contract_dilation: bool = True):
        super().__init__()
        if depth not in STANDARD_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STANDARD_BLOCKS)}, got {depth}")
        if output_stride not in STRIDES_DILATIONS:
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if stem not in ("deep", "plain"):
            raise ValueError(f"stem must be 'deep' or 'plain', got {stem!r}")
        block = Bottleneck if depth >= 50 else BasicBlock
        blocks = tuple(blocks) or STANDARD_BLOCKS[depth]
        strides, dilations = STRIDES_DILATIONS[output_stride]
        self.stem_type = stem
        if stem == "deep":  # (B, base, H/2, W/2) after three 3x3 convs
            self.stem = nn.Sequential(*conv_bn_relu(3, stem_width, 2),
                                      *conv_bn_relu(stem_width, stem_width),
                                      *conv_bn_relu(stem_width, base_width))
        else:  # torchvision: conv1 7x7/2 + bn1 + relu
            self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(base_width)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)  # (B, base, H/4, W/4)

        inplanes = base_width
        self.out_channels: list[int] = []
        for i, (n, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
            planes = base_width * 2**i
            first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            layers = [block(inplanes, planes, stride, first_dilation, downsample)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes, 1, dilation) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(inplanes)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stem_type == "deep":
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        c2 = self.layer1(x)  # (B, 256, H/4, W/4)
        c3 = self.layer2(c2)  # (B, 512, H/8, W/8)
        c4 = self.layer3(c3)  # (B, 1024, H/8 | H/16, ...)
        c5 = self.layer4(c4)  # (B, 2048, H/8 | H/16 | H/32, ...)
        return [c2, c3, c4, c5]
