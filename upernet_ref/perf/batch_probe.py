"""The per-device batch that fits in memory: the trainer's own step probed on random data.

The published global batch (16, or 8 for Cityscapes) is kept on whatever memory there is by
splitting it into per-device micro-batches and gradient accumulation (`training.data_order`);
this module finds the largest per-device part that fits on a CUDA device.
"""
from __future__ import annotations

import contextlib
import typing

import torch
from torch import nn

from upernet_ref.collectives import use_sync_bn
from upernet_ref.launch import DistInfo, all_reduce_max
from upernet_ref.configs import Config
from upernet_ref.training.data_order import batch_decomposition
from upernet_ref.training.runtime import grad_scaler
from upernet_ref.training.schedule import build_optimizer
from upernet_ref.training.trainer import train_step


def probe_per_device_batch(model: nn.Module, cfg: Config, info: DistInfo) -> int | None:
    """What `upernet train` gives the loop as its per-device batch when none is asked for: on
    CUDA the largest that fits (`choose_per_device_batch`, on the model placed as it will train),
    the same on every process (the smallest); None elsewhere (the loop takes the whole share)."""
    if info.device.type != "cuda":
        return None
    share = batch_decomposition(cfg.train.batch_size, info.world_size)[0]
    sync_bn = use_sync_bn(cfg.train.norm, info.world_size, info.device)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    # plain BN needs 2 images: the PPM's 1x1 pooled branch has one value per channel per image
    chosen = choose_per_device_batch(model, cfg, info.device, share, 1 if sync_bn else 2)
    if info.distributed:  # every process must use the same: take the smallest
        chosen = -int(all_reduce_max(torch.tensor([-chosen], device=info.device)).item())
    return chosen


@contextlib.contextmanager
def batchnorm_running_stats(model: nn.Module, enabled: bool = True) -> typing.Iterator[None]:
    """Inside the block, `model`'s BatchNorms in train mode use their running statistics: how a
    training step at batch 1 is sized (plain BN cannot train on one image, SyncBN across GPUs
    can, and BN with running statistics needs the same memory). Train mode is put back."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] if enabled else []
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def largest_fitting_batch(candidates: typing.Iterable[int],
                          fits: typing.Callable[[int], bool]) -> int | None:
    """The first of `candidates` (largest first) for which `fits(batch)` is True, else None."""
    for batch in candidates:
        if fits(batch):
            return batch
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA allocation failure: torch's OutOfMemoryError, or cuBLAS / cuDNN failing to get
    their workspace (raised as a plain RuntimeError)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower()
                                              or "STATUS_ALLOC_FAILED" in text)


def choose_per_device_batch(model: nn.Module, cfg: Config, device: torch.device,
                            share: int, smallest: int = 1, headroom: float = 0.9) -> int:
    """The largest divisor of `share` (this process's part of the global batch) whose training
    step fits in memory.

    On CPU: the full share (memory is rarely the limit there). On CUDA: run the trainer's own
    step (`trainer.train_step`: forward, the configuration's loss, backward, the SGD update with its
    momentum buffers) on random data at the crop size for each divisor, largest first. A batch
    fits if it does not run out of memory and its peak, plus what DDP adds later (its gradient
    buckets, about one more copy of the weights), stays under `headroom` of the device's memory.
    The model's weights, BN statistics and the random state are left as they were.
    """

    if device.type != "cuda":
        return share
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h, w = cfg.data.crop_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = headroom * torch.cuda.get_device_properties(device).total_memory

    def fits(batch: int) -> bool:
        optimizer = build_optimizer(model, cfg.train)  # fresh: no momentum left from a probe
        scaler = grad_scaler(cfg.train.amp, device)
        images = masks = None
        torch.cuda.reset_peak_memory_stats(device)
        try:  # batch 1 is allowed with SyncBN (converted later)
            images = torch.randn(batch, 3, h, w, device=device)
            masks = torch.randint(0, cfg.data.num_classes, (batch, h, w), device=device)
            with batchnorm_running_stats(model, batch == 1):
                train_step(model, (images, masks), optimizer, scaler, cfg, check_finite=False)
            return torch.cuda.max_memory_allocated(device) + weight_bytes <= limit
        except RuntimeError as err:
            if is_out_of_memory(err):
                return False
            raise
        finally:
            model.zero_grad(set_to_none=True)
            optimizer = scaler = images = masks = None
            torch.cuda.empty_cache()

    divisors = [d for d in range(share, 0, -1) if share % d == 0 and d >= min(smallest, share)]
    with torch.random.fork_rng(devices=[device]):
        chosen = largest_fitting_batch(divisors, fits)
    with torch.no_grad():  # the probes' updates undone
        model.load_state_dict(saved)
    if chosen is None:
        raise RuntimeError(f"even a per-device batch of {smallest} at crop {h}x{w} does not fit "
                           f"in {headroom:.0%} of the memory of {device}; try --train.amp=bf16 "
                           f"or a smaller crop")
    return chosen
