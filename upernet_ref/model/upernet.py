"""UPerNet: dilated ResNet + PPM + FPN fusion head (+ FCN auxiliary head), and `build_model`.

`forward(images)` returns `{"out": logits}` at the input resolution (bilinear,
align_corners=False), plus `"aux"` when the model has an auxiliary head and is training,
like torchvision's segmentation models.

The model is also a Hugging Face Hub model (huggingface_hub's `PyTorchModelHubMixin`):
`model.save_pretrained(DIR)` writes `model.safetensors`, `config.json` (the whole `Config` it was
built from) and a model card; `UPerNet.from_pretrained(DIR_or_repo_id)` rebuilds it;
`model.push_to_hub("user/name")` uploads it. The folder logic is in `upernet_ref.hub`.
"""
from __future__ import annotations

import os

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from upernet_ref.model.backbone import ResNet
from upernet_ref import configs
from upernet_ref.configs import Config, ConfigError, ModelConfig, get_config
from upernet_ref.model.head import FCNHead, UPerHead
from upernet_ref.model.layers import resize


class UPerNet(nn.Module, PyTorchModelHubMixin, library_name="upernet_ref", license="other",
              pipeline_tag="image-segmentation", paper_url="https://arxiv.org/abs/1807.10221",
              tags=["semantic-segmentation", "upernet"]):
    """The network of the paper (Fig. 4): backbone -> PPM on C5 + FPN over C2..C5 -> fused
    classifier; an FCN head on C4 for the auxiliary loss. `config`: the whole `Config` it was
    built from (set by `build_model`), saved by `save_pretrained` as config.json."""

    config: Config | None = None

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

    # ---- the Hugging Face Hub conventions (see upernet_ref.hub)

    def save_pretrained(self, save_directory, *, config: dict | None = None, **kwargs):
        """huggingface_hub's `save_pretrained`, with this model's whole configuration as
        config.json by default. `model_card_kwargs` may give `metrics` (an eval JSON),
        `command`, `iteration` and `max_iters` for the model card."""
        from upernet_ref.hub import model_config
        if config is None:
            config = configs.to_dict(model_config(self))
        return super().save_pretrained(save_directory, config=config, **kwargs)

    def generate_model_card(self, *args, **kwargs):
        from upernet_ref.hub import model_card, model_config
        return model_card(model_config(self), **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download,
                         local_files_only, token, config: dict | None = None,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        from upernet_ref.hub import load_pretrained
        return load_pretrained(cls, model_id, config, map_location, revision=revision,
                               cache_dir=cache_dir, force_download=force_download,
                               local_files_only=local_files_only, token=token)


def build_model(config: Config | ModelConfig | str) -> UPerNet:
    """The UPerNet for a configuration (a `Config`, its `ModelConfig`, or a config name)."""
    if isinstance(config, str):
        config = get_config(config)
    full = config if isinstance(config, Config) else None
    if full is not None:
        config = full.model
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model takes a Config, ModelConfig or name, got {type(config).__name__}")
    if config.num_classes < 1:
        raise ConfigError("model.num_classes is 0: build from a Config (data.num_classes) or "
                          "give ModelConfig(num_classes=N)")
    check_fits(config)
    model = UPerNet(config)
    model.config = full  # what save_pretrained writes as config.json
    return model


def check_fits(config: ModelConfig) -> None:
    """Refuse, before any tensor is allocated, a model whose fp32 weights alone exceed this
    machine's memory (sizes read from a file: 10^9 classes would try to allocate 64 GB). The
    model is built on the meta device, which allocates nothing."""
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
