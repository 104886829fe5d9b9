"""The data order of a run: which images make up each global batch, on any number of processes.

The published recipes train on 8 GPUs with a global batch of 16 (8 for Cityscapes; docs/SPEC.md,
"Training recipe"). `batch_decomposition` splits it into per-device batch x processes x
accumulation steps; `GlobalBatchOrder` fixes which items each global batch holds from (seed,
iteration) alone, so the images seen do not depend on the hardware and a resumed run only needs
the iteration number; `SeededItems` seeds each item's augmentations by its stream position.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


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
