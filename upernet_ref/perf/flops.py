"""Counting multiply-accumulates (MACs) by running the model, not by hand, and the forward
passes a test protocol makes.

`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of every convolution and matrix
product a forward pass executes (2 FLOPs per multiply-accumulate); BatchNorm, ReLU, pooling and
interpolation are not counted, as in the published GMAC figures (docs/SPEC.md,
"The 12 published results"). Running on the
`meta` device makes this free for the full-size models.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from upernet_ref.configs import TestConfig
from upernet_ref.evaluation.inference import window_grid


def count_macs(model: nn.Module, input_size: tuple[int, int], batch: int = 2,
               device: str | torch.device = "meta") -> int:
    """Multiply-accumulates of one forward pass of `model` per image at `input_size` (H, W).

    `batch` is 2 by default so that a model in training mode (BatchNorm on a 1x1 pooled map)
    runs; the count is per image.

    The model is moved to `device` (default `meta`: no memory, no compute) if it is not already
    there; its train/eval mode decides whether the auxiliary head is counted.
    """
    params = list(model.parameters())
    if params and params[0].device != torch.device(device):
        model = model.to(device)
    x = torch.zeros(batch, 3, *input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2 // batch


def num_forward_passes(size: tuple[int, int], test: TestConfig) -> int:
    """How many network forwards `inference` makes for an image of `size` (h, w)."""
    total = 0
    for scale in test.scales:
        s = (int(size[0] * scale + 0.5), int(size[1] * scale + 0.5))
        views = len(window_grid(s, test.crop_size, test.stride)) if test.mode == "slide" else 1
        total += views * (2 if test.flip else 1)
    return total
