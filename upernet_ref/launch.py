"""torchrun's environment: the device of this process, joining and leaving the process group.

A command (`upernet train`, `upernet eval`) calls `init_distributed(device)` before any work:
it reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; without them (or with WORLD_SIZE=1) no
process group is created, with them the process joins one (nccl on CUDA, gloo on CPU), and
`cleanup` leaves it. The reading core only asks the group (`collectives.rank_and_world`).
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group (and `cleanup` ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """"auto"/None -> cuda:LOCAL_RANK if CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1; a single process otherwise."""
    rank, world_size = launch_rank_and_world()
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set: start several "
                                   f"processes with torchrun (see README, 'Training')")
        kwargs: dict[str, typing.Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        owns_group = True
    return DistInfo(rank, world_size, local_rank, dev, owns_group)


def cleanup(info: DistInfo | None = None) -> None:
    """Leave the process group if `info` says we created it (or, without `info`, if any)."""
    if info is not None and not info.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun set them ((0, 1) without torchrun): what a command knows
    before the process group exists or after it ended (its error report)."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of `tensor` over processes, in place; a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
