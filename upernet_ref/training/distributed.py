"""One process or many: torchrun's environment, the process group, and the data order.

The published recipes train on 8 GPUs with SyncBN and a global batch of 16 (8 for
Cityscapes; docs/SPEC.md, "Training recipe"); users want the same recipe on 1-2 GPUs or a CPU. The
trainer therefore runs one code path everywhere:

- `init_distributed()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK. Without them (or with
  WORLD_SIZE=1) no process group is created and plain BatchNorm is used; with them it joins a
  group (nccl on CUDA, gloo on CPU).
- `GlobalBatchOrder` fixes *which* images make up each global batch from (seed, iteration)
  alone, like `DistributedSampler` seeded by (seed, epoch), but over one endless stream of
  epochs. Every process takes its slice of the global batch, and gradient accumulation takes the
  rest, so the images seen do not depend on the number of processes or the per-device batch, and
  resuming only needs the iteration number. Each item also gets its own random seed (for the
  augmentations) from its position in the stream.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
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
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set: start several "
                                   f"processes with torchrun (see README, 'Training')")
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        owns_group = True
    return DistInfo(rank, world_size, local_rank, dev, owns_group)


def cleanup(info: DistInfo | None = None) -> None:
    """Leave the process group if `info` says we created it (or, without `info`, if any)."""
    if info is not None and not info.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over processes, in place; a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of `tensor` over processes, in place; a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


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


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every process."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# --------------------------------------------------------------------------------------------
# The data order


def batch_decomposition(global_batch: int, world_size: int,
                        per_device_batch: int | None = None) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with per_device x world x steps = global batch.

    With `per_device_batch=None` the full share (global / world) is returned with 1 step.
    """
    if global_batch % world_size:
        raise ValueError(f"the global batch {global_batch} cannot be split over {world_size} "
                         f"processes; use a number of processes that divides it (or override "
                         f"--train.batch_size)")
    share = global_batch // world_size
    if per_device_batch is None:
        return share, 1
    if per_device_batch <= 0 or share % per_device_batch:
        divisors = [d for d in range(1, share + 1) if share % d == 0]
        raise ValueError(f"--per-device-batch {per_device_batch} does not divide the per-process "
                         f"share {share} of the global batch {global_batch} over {world_size} "
                         f"process(es); valid values: {divisors}")
    return per_device_batch, share // per_device_batch


@dataclass(frozen=True)
class GlobalBatchOrder:
    """Which dataset items make up global batch `iteration`, and which part is this process's.

    The stream is epoch 0's permutation, then epoch 1's, ...; epoch e's permutation is drawn
    from a generator seeded with seed + e (DistributedSampler's convention). Global batch `it`
    is stream positions [it x B, (it + 1) x B). Micro-step `a` of rank `r` takes the slice
    [(a x world + r) x b, ... + b) of it, b the per-device batch.
    """

    num_items: int
    global_batch: int
    seed: int = 0
    shuffle: bool = True

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def position(self, iteration: int) -> tuple[int, int]:
        """(epoch, index within the epoch) where global batch `iteration` starts."""
        start = iteration * self.global_batch
        return start // self.num_items, start % self.num_items

    def stream(self, start: int, count: int) -> list[tuple[int, int]]:
        """[(dataset index, stream position)] for stream positions start .. start+count-1."""
        out, cache = [], {}
        for pos in range(start, start + count):
            epoch = pos // self.num_items
            if epoch not in cache:
                cache = {epoch: self.permutation(epoch)}
            out.append((cache[epoch][pos % self.num_items], pos))
        return out

    def micro_batches(self, iteration: int, rank: int, world_size: int,
                      per_device_batch: int) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of global batch `iteration`, each [(index, position)]."""
        items = self.stream(iteration * self.global_batch, self.global_batch)
        steps = self.global_batch // (world_size * per_device_batch)
        return [items[(a * world_size + rank) * per_device_batch:
                      (a * world_size + rank + 1) * per_device_batch] for a in range(steps)]


class MicroBatchSampler(torch.utils.data.Sampler):
    """Endless batch sampler for a DataLoader: this process's micro-batches from `start_iter` on."""

    def __init__(self, order: GlobalBatchOrder, rank: int, world_size: int,
                 per_device_batch: int, start_iter: int = 0):
        self.order, self.rank, self.world_size = order, rank, world_size
        self.per_device_batch, self.start_iter = per_device_batch, start_iter

    def __iter__(self):
        it = self.start_iter
        while True:
            yield from self.order.micro_batches(it, self.rank, self.world_size, self.per_device_batch)
            it += 1


class SeededItems(torch.utils.data.Dataset):
    """`dataset[index]` with the random augmentations seeded by (seed, stream position).

    The item's random draws (torch, numpy, random) no longer depend on the worker, the process
    or what came before: the same stream position gives the same crop and flip on any hardware
    and after a resume. The caller's random states are restored afterwards.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        item_seed = (self.seed * 1_000_003 + position) % (2 ** 31)
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(item_seed)  # CPU only: CUDA streams (dropout) untouched
        np.random.seed(item_seed)
        random.seed(item_seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
