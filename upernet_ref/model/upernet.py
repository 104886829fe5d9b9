"""UPerNet: dilated ResNet + PPM + FPN fusion head (+ FCN auxiliary head), and `build_model`.

`forward(images)` returns `{"out": logits}` at the input resolution (bilinear,
align_corners=False), plus `"aux"` when the model has an auxiliary head and is training,
like torchvision's segmentation models. A plain `nn.Module`: sharing it as a Hugging Face
folder (`upernet_ref.hub.save_pretrained` / `from_pretrained`) is the shell's business.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch._guards import detect_fake_mode

from upernet_ref.configs import Config, ConfigError, DataConfig, ModelConfig, get_config
from upernet_ref.model.backbone import ResNet
from upernet_ref.model.head import FCNHead, UPerHead
from upernet_ref.model.layers import resize


class UPerNet(nn.Module):
    """The network of the paper (figure 3; docs/SPEC.md, "Paper vs published recipe"):
    backbone -> PPM on C5 + FPN over C2..C5 -> fused classifier; an FCN head on C4 for the
    auxiliary loss. `config`: the whole `Config` it is built from (the network reads
    `config.model`; a saved model folder stores all of it, so the folder alone rebuilds it)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        m = config.model
        self.backbone = ResNet(m.depth, m.output_stride, m.stem, m.blocks, m.base_width,
                               m.stem_width)
        chans = self.backbone.out_channels
        self.decode_head = UPerHead(chans, m.head_channels, m.num_classes, m.pool_scales,
                                    m.dropout)
        self.aux_head = (FCNHead(chans[2], m.aux_channels, m.num_classes, m.dropout)
                         if m.aux_head else None)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        features = self.backbone(images)  # [C2, C3, C4, C5]
        result = {"out": resize(self.decode_head(features), size)}
        if self.aux_head is not None and self.training:
            result["aux"] = resize(self.aux_head(features[2]), size)
        return result


def build_model(config: Config | ModelConfig | str) -> UPerNet:
    """The UPerNet for a configuration (a `Config`, a bare `ModelConfig`, or a config name)."""
    if isinstance(config, str):
        config = get_config(config)
    if isinstance(config, ModelConfig):  # a bare network: the default sections around it
        if config.num_classes < 1:
            raise ConfigError("model.num_classes is 0: build from a Config (data.num_classes) or "
                              "give ModelConfig(num_classes=N)")
        config = Config(name="custom", model=config,
                        data=DataConfig(num_classes=config.num_classes))
    if not isinstance(config, Config):
        raise TypeError(f"build_model takes a Config, ModelConfig or name, got {type(config).__name__}")
    check_fits(config)
    return UPerNet(config)


def check_fits(config: Config) -> None:
    """Refuse, before any tensor is allocated, a model whose fp32 weights alone exceed this
    machine's memory (sizes read from a file: 10^9 classes would try to allocate 64 GB). The
    model is built on the meta device, which allocates nothing."""
    if detect_fake_mode() is not None:  # under fake tensors (the memory estimate): none allocated
        return
    with torch.device("meta"):
        n = count_parameters(UPerNet(config))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n > memory:
        raise ConfigError(f"model: {n:,} parameters need {4 * n / 1e9:,.0f} GB for the weights "
                          f"alone, more than this machine's {memory / 1e9:,.0f} GB; check "
                          f"data.num_classes and the model.* widths")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
