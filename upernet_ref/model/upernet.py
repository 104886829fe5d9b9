"""UPerNet: dilated ResNet + PPM + FPN fusion head (+ FCN auxiliary head), and `build_model`.

`forward(images)` returns `{"out": logits}` at the input resolution (bilinear,
align_corners=False), plus `"aux"` when the model has an auxiliary head and is training,
like torchvision's segmentation models.
"""
from __future__ import annotations

import torch
from torch import nn

from upernet_ref.model.backbone import ResNet
from upernet_ref.configs import Config, ModelConfig, get_config
from upernet_ref.model.head import FCNHead, UPerHead
from upernet_ref.model.layers import resize


class UPerNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(cfg.depth, cfg.output_stride, cfg.stem, cfg.blocks,
                               cfg.base_width, cfg.stem_width)
        chans = self.backbone.out_channels
        self.decode_head = UPerHead(chans, cfg.head_channels, cfg.num_classes, cfg.pool_scales,
                                    cfg.dropout)
        self.aux_head = (FCNHead(chans[2], cfg.aux_channels, cfg.num_classes, cfg.dropout)
                         if cfg.aux_head else None)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        features = self.backbone(images)  # [C2, C3, C4, C5]
        result = {"out": resize(self.decode_head(features), size)}
        if self.aux_head is not None and self.training:
            result["aux"] = resize(self.aux_head(features[2]), size)
        return result


def build_model(config: Config | ModelConfig | str) -> UPerNet:
    """The UPerNet for a configuration (a `Config`, its `ModelConfig`, or a config name)."""
    if isinstance(config, str):
        config = get_config(config)
    if isinstance(config, Config):
        config = config.model
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model takes a Config, ModelConfig or name, got {type(config).__name__}")
    return UPerNet(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    A fresh BatchNorm (mean 0, variance 1, weight 1, bias 0) is the identity in eval mode, so a
    comparison of two implementations, or of a model with its BN-folded copy, could pass with the
    BN wired wrongly. After this every BN is a non-trivial affine map. Returns `model`.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.uniform_(0.5, 1.5, generator=generator)
            m.bias.uniform_(-0.2, 0.2, generator=generator)
    return model
