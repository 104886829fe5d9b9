"""One process or many: torchrun's environment, the process group and its collectives.

The published recipes train on 8 GPUs with SyncBN and a global batch of 16 (8 for Cityscapes;
docs/SPEC.md, "Training recipe"); users want the same recipe on 1-2 GPUs or a CPU, so the loop
runs one code path everywhere. The command joins torchrun's
process group (`launch.init_distributed`); these collectives are no-ops without one, so the
loop and the evaluation call them always.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes) in the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over processes, in place; a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any process (every process must call)."""
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def use_sync_bn(norm: str, world_size: int, device: torch.device) -> bool:
    """SyncBN with several CUDA processes (torch's SyncBatchNorm is CUDA-only), else BN."""
    if norm not in ("auto", "batchnorm", "syncbn"):
        raise ValueError(f"train.norm must be auto, batchnorm or syncbn, got {norm!r}")
    if norm == "syncbn" and world_size > 1 and device.type != "cuda":
        raise ValueError("train.norm=syncbn needs CUDA devices (torch's SyncBatchNorm is "
                         "CUDA-only); use train.norm=auto or batchnorm on CPU")
    return world_size > 1 and norm in ("auto", "syncbn") and device.type == "cuda"


def all_gather_object(obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in one process."""
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
