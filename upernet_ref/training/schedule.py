"""The optimiser and the poly learning-rate schedule of the published recipe
(docs/SPEC.md, "Training recipe").

SGD with lr 0.01, momentum 0.9, weight decay 5e-4 on *all* parameters (BatchNorm and biases
included), one learning rate for all, no nesterov. The learning rate follows the "poly" policy
of DeepLab (Chen et al. 2017), stepped every iteration:

    lr(it) = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr,   power 0.9

with min_lr = 1e-4 (1% of the base lr) and no warmup. An optional linear warmup (mmcv's
"linear" policy) scales that value by 1 - (1 - it / warmup_iters) * (1 - warmup_ratio), so it
starts at lr(0) x warmup_ratio and joins the poly curve at `warmup_iters`.

The recipes count epochs; the trainer counts iterations: `iters_per_epoch(n_images, batch)`.
"""
from __future__ import annotations

import torch
from torch import nn

from upernet_ref.configs import TrainConfig


def poly_lr(iteration: int, max_iters: int, base_lr: float, min_lr: float = 1e-4,
            power: float = 0.9, warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> float:
    """The learning rate at `iteration` (0-based: the lr used by the update of iteration+1)."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    progress = min(max(iteration, 0), max_iters) / max_iters
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if warmup_iters > 0 and iteration < warmup_iters:
        lr *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return lr


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """`poly_lr` as a torch scheduler: call `step()` once per iteration, after `optimizer.step()`.

    `last_epoch` counts iterations here. The base lr of each parameter group is the poly
    curve's `base_lr` (so all groups share one schedule shape, as in the reference).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, min_lr: float = 1e-4,
                 power: float = 0.9, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
                 last_epoch: int = -1):
        self.max_iters = max_iters
        self.min_lr = min_lr
        self.power = power
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [poly_lr(self.last_epoch, self.max_iters, base, self.min_lr, self.power,
                        self.warmup_iters, self.warmup_ratio) for base in self.base_lrs]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over every parameter with one lr and one weight decay (BN and biases included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay, nesterov=train_cfg.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig,
                    max_iters: int | None = None) -> PolyLR:
    """The poly schedule of `train_cfg` over `max_iters` (default: epochs x iters_per_epoch)."""
    return PolyLR(optimizer, max_iters or train_cfg.max_iters, train_cfg.min_lr,
                  train_cfg.lr_power, train_cfg.warmup_iters, train_cfg.warmup_ratio)


def iters_per_epoch(num_images: int, batch_size: int) -> int:
    """Iterations in one epoch: images / global batch, rounded to the nearest integer.

    This reproduces the model card's numbers: VOC trainaug 10,582 / 16 -> 661, ADE20K 20,210
    / 16 -> 1,263, Cityscapes 2,975 / 8 -> 372.
    """
    if num_images <= 0 or batch_size <= 0:
        raise ValueError(f"need positive sizes, got {num_images} images, batch {batch_size}")
    return max(1, round(num_images / batch_size))


def epochs_to_iters(epochs: int, num_images: int, batch_size: int) -> int:
    """Total iterations for `epochs` passes over `num_images` at `batch_size` per iteration."""
    return epochs * iters_per_epoch(num_images, batch_size)
