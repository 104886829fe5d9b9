"""`upernet memory`: how much device memory a training step needs, estimated without running it.

    upernet memory --config upernet_r50_os8_ade20k                  # the published per-GPU batch
    upernet memory --config upernet_r101_os8_cityscapes --batch 8 --amp bf16 --memory-gb 24
    upernet memory --config all --json memory.json                  # the table of docs/benchmarks.md

Will the published per-GPU batch (16 images over 8 GPUs = 2 per GPU; 1 for Cityscapes) fit on
my GPU, and how large a batch fits on one 80 GB GPU? The answer is computed on any machine, in
seconds, by running two of the trainer's own steps (`trainer.train_step`: the real model, loss and
optimizer) on *fake* tensors
(`torch._subclasses.FakeTensorMode`: shapes and dtypes, no data, no arithmetic) while torch's
memory tracker (`torch.distributed._tools.mem_tracker.MemTracker`) follows every tensor's
lifetime. The peak of the second step is reported, split into weights, optimizer state (SGD
momentum), activations kept for the backward pass and temporaries.

What the estimate leaves out, so read it as a lower bound: the CUDA context (~0.5 GB, not
counted by the allocator either), cuDNN / cuBLAS workspaces, allocator rounding and
fragmentation, DDP's gradient buckets (one more copy of the weights), and torch.compile's
different intermediates. Autocast follows the CPU's bf16 policy, which casts the same
convolutions as CUDA's. Measured so far only on a CPU: the estimate was 60-78% of the peak
resident memory of a real training step (which also counts oneDNN scratch space and freed
memory the C allocator keeps), and its growth per image 87% of the measured growth.
`tests/test_cuda.py` compares it with `torch.cuda.max_memory_allocated` on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from upernet_ref import configs
from upernet_ref.configs import Config

MB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step (forward, loss, backward, SGD step), in MiB."""
    config: str
    batch: int
    size: tuple[int, int]
    amp: str
    weights_mb: float
    optimizer_mb: float  # SGD momentum buffers
    activations_mb: float  # tensors kept for the backward pass, and gradients
    temporary_mb: float
    total_mb: float


def estimate_training_memory(cfg: Config | str, batch: int, size: tuple[int, int] | None = None,
                             amp: str | None = None) -> MemoryEstimate:
    """Estimate the peak memory of a training step of `cfg` at `batch` images of `size`.

    Args:
        cfg: a Config or configuration name.
        batch: images per device.
        size: input HxW (default: the config's crop size).
        amp: "none" or "bf16" / "fp16" autocast (default: the config's `train.amp`).
    """
    cfg = configs.get_config(cfg)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    h, w = tuple(size or cfg.data.crop_size)
    return _estimate(cfg, batch, (h, w), amp or cfg.train.amp)


@functools.lru_cache(maxsize=64)  # `upernet memory` asks for batch 2 twice (its row, the search)
def _estimate(cfg: Config, batch: int, size: tuple[int, int], amp: str) -> MemoryEstimate:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from upernet_ref.model.upernet import build_model
    from upernet_ref.perf.batch_probe import batchnorm_running_stats
    from upernet_ref.training.schedule import build_optimizer
    from upernet_ref.training.trainer import train_step

    h, w = size
    cfg = configs.override(cfg, {"train.amp": amp})
    with FakeTensorMode():  # fake tensors: no memory is used and nothing is computed
        model = build_model(cfg)
        optimizer = build_optimizer(model, cfg.train)
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp16's scaling adds no tensor
        images = torch.randn(batch, 3, h, w)
        labels = torch.randint(0, cfg.data.num_classes, (batch, h, w))
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker, batchnorm_running_stats(model, batch == 1):
            for step in range(2):  # the second step has the momentum buffers
                train_step(model, (images, labels), optimizer, scaler, cfg, check_finite=False)
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = {str(kind).split(".")[-1]: value / MB
               for per_device in peak.values() for kind, value in per_device.items()}
    return MemoryEstimate(
        config=cfg.name, batch=batch, size=(h, w), amp=amp,
        weights_mb=by_kind.get("PARAM", 0.0) + by_kind.get("BUFFER", 0.0),
        optimizer_mb=by_kind.get("OPT", 0.0),
        activations_mb=by_kind.get("ACT", 0.0) + by_kind.get("GRAD", 0.0),
        temporary_mb=by_kind.get("TEMP", 0.0) + by_kind.get("OTH", 0.0),
        total_mb=by_kind.get("Total", 0.0))


def largest_batch(cfg: Config | str, memory_gb: float, size: tuple[int, int] | None = None,
                  amp: str | None = None, headroom: float = 0.85) -> tuple[int, MemoryEstimate]:
    """The largest per-device batch whose estimate stays under `headroom` x `memory_gb`, and
    its estimate (batch 1 and its estimate when not even one image fits).

    Memory is close to affine in the batch (weights + batch x per-image), so the estimates at
    batch 2 and 4 place the answer; a bisection settles it when the affine guess is too large.
    """
    budget = headroom * memory_gb * 1024  # MiB
    two = estimate_training_memory(cfg, 2, size, amp)
    four = estimate_training_memory(cfg, 4, size, amp)
    per_image = max((four.total_mb - two.total_mb) / 2, 1e-3)
    guess = max(1, int((budget - (two.total_mb - 2 * per_image)) // per_image))
    estimate = estimate_training_memory(cfg, guess, size, amp)
    if estimate.total_mb <= budget or guess == 1:
        return guess, estimate
    fits, fits_estimate = 1, estimate_training_memory(cfg, 1, size, amp)  # known: guess does not
    too_big = guess
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        estimate = estimate_training_memory(cfg, middle, size, amp)
        if estimate.total_mb <= budget:
            fits, fits_estimate = middle, estimate
        else:
            too_big = middle
    return fits, fits_estimate
