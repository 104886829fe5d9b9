"""One training step: the unit the trainer repeats, the benchmark times and the memory
estimate and batch probe size.

    losses = train_step(model, [(images, masks), ...], optimizer, scaler, cfg)

One step is one SGD update on one global batch (16 images, 8 for Cityscapes; docs/SPEC.md,
"Training recipe"), whatever the hardware: the batch arrives as this process's micro-batches,
and for each one the step runs

1. the forward pass under autocast (`train.amp`: none, bf16 or fp16), in channels_last when
   `train.channels_last`;
2. the configuration's loss (`losses.segmentation_loss`: `loss_weight` x cross-entropy on the
   output + `aux_loss_weight` x cross-entropy on the auxiliary head, with `class_weights`, OHEM
   and `data.ignore_index`), divided by the number of micro-batches so that the summed
   gradients are the mean over the whole batch;
3. the backward pass, through the AMP scaler (a no-op unless fp16). Under DDP the gradients are
   all-reduced on the last micro-batch only (`no_sync` on the others).

Then the loss is checked to be finite, on every process at once with `distributed=True` (so
all stop together), *before* the update: a NaN never reaches the weights. Finally the scaler
steps the optimizer. The learning-rate schedule is stepped by the caller (the benchmark has
none); the model's train/eval mode is the caller's too (the batch probe runs BatchNorm with
running statistics at batch 1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing

import torch
from torch import nn

from upernet_ref.configs import Config
from upernet_ref.errors import UperNetError
from upernet_ref.collectives import all_reduce_sum
from upernet_ref.training.losses import segmentation_loss
from upernet_ref.training.runtime import autocast

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) float, masks (B, H, W) int64


class NonFiniteLossError(UperNetError, RuntimeError):
    """The loss (or a weight) became NaN or infinite; training stopped before applying that
    update or writing anything non-finite (exit 3)."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class StepLosses:
    """The losses of one step, averaged over its micro-batches (and processes): 0-dim tensors.

    `loss` is what was minimised; `loss_out` and `loss_aux` are the *unweighted* cross-entropies
    of the two heads (`loss_aux` is 0 without an auxiliary head or weight).
    """
    loss: torch.Tensor
    loss_out: torch.Tensor
    loss_aux: torch.Tensor


def train_step(model: nn.Module, batch: Batch | typing.Sequence[Batch],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: Config, *,
               distributed: bool = False, check_finite: bool = True) -> StepLosses:
    """Forward, loss, backward over the micro-batches of `batch`, then one optimizer update.

    Args:
        model: the network, possibly wrapped (DistributedDataParallel, torch.compile); in the
            mode the caller wants (train mode for training).
        batch: one (images, masks) pair, or a sequence of them (gradient accumulation); moved
            to the device of the optimized weights here, one micro-batch at a time.
        optimizer: e.g. `schedule.build_optimizer(model, cfg.train)`.
        scaler: `torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")`.
        cfg: `cfg.train` gives amp, channels_last and the loss; `cfg.data.ignore_index`.
        distributed: average the losses over the processes of the group (every process must
            call); the non-finite check is then the same everywhere.
        check_finite: raise `NonFiniteLossError` before the update on a NaN / inf loss (it
            reads the loss back: False under FakeTensorMode, where values do not exist).

    Returns:
        The step's `StepLosses`.
    """
    micro_batches = [batch] if isinstance(batch[0], torch.Tensor) else list(batch)
    count = len(micro_batches)
    device = optimizer.param_groups[0]["params"][0].device
    ddp = _ddp_module(model)
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3, device=device)  # loss, loss_out, loss_aux
    for i, (images, masks) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # DDP all-reduces the gradients on the last micro-batch only
        sync = ddp.no_sync() if ddp is not None and i < count - 1 else contextlib.nullcontext()
        with sync:
            with autocast(cfg.train.amp, device):
                outputs = model(images)
            loss, parts = segmentation_loss(outputs, masks, cfg.train, cfg.data.ignore_index)
            scaler.scale(loss / count).backward()
        sums += torch.stack([loss.detach(), parts["loss_out"],
                             parts.get("loss_aux", torch.zeros((), device=device))]) / count
    if distributed and torch.distributed.is_initialized():
        sums = all_reduce_sum(sums) / torch.distributed.get_world_size()
    losses = StepLosses(*sums)
    if check_finite and not torch.isfinite(losses.loss).item():
        raise NonFiniteLossError(f"non-finite loss ({losses.loss.item()})")
    scaler.step(optimizer)
    scaler.update()
    return losses


def _ddp_module(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper of `model`, also under torch.compile; else None."""
    for candidate in (model, getattr(model, "_orig_mod", None)):
        if isinstance(candidate, nn.parallel.DistributedDataParallel):
            return candidate
    return None
