"""The recipe's training loop (docs/SPEC.md, "Training recipe"): one step, and the loop around it.

    losses = train_step(model, [(images, masks), ...], optimizer, scaler, cfg)
    result = train(cfg, model, train_set, val_set, out_dir, save=save_checkpoint)

`train_step` is one SGD update on one global batch (16 images, 8 for Cityscapes), whatever the
hardware: the batch arrives as this process's micro-batches, and for each one it runs the
forward pass under autocast (`train.amp`), the configuration's loss (`losses.segmentation_loss`)
divided by the number of micro-batches (so the summed gradients are the mean over the batch) and
the backward pass through the AMP scaler; under DDP the gradients are all-reduced on the last
micro-batch only. The loss is checked finite on every process *before* the update, so a NaN
never reaches the weights. The benchmark, the memory estimate and the batch probe time and size
this same function.

`train` reads top to bottom like nanoGPT's loop: set-up (device, SyncBN with several GPUs, the
batch decomposition, SGD + poly schedule + AMP scaler, resume, DDP, the data order), then
`for it in ...:` this process's micro-batches of global batch `it` -> `train_step` -> the
schedule's step -> log / checkpoint / validate at their intervals, and one try/finally. It knows
no run folder, signal handler, file format or progress bar: the command (`cli/train.py`) builds
the model and the data, locks the folder and passes in how to save, log, say and when to stop.
The global batch is kept whatever the hardware (per-device batch x processes x accumulation
steps; `data_order`), and its items depend on (seed, iteration) only, so a checkpoint (weights,
momentum, schedule, AMP scale, every process's RNG state, the iteration) continues exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import typing
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from upernet_ref import configs
from upernet_ref.collectives import (all_gather_object, all_reduce_sum, any_process, barrier,
                                     rank_and_world,
                                     use_sync_bn)
from upernet_ref.configs import Config
from upernet_ref.data.datasets import skipped_samples
from upernet_ref.errors import NonFiniteLossError, before_work
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.training.data_order import (GlobalBatchOrder, MicroBatchSampler, SeededItems,
                                             batch_decomposition)
from upernet_ref.training.losses import segmentation_loss
from upernet_ref.training.runtime import (autocast, check_finite_state, grad_scaler,
                                          restore_deterministic, rng_state, seed_everything,
                                          set_deterministic, set_rng_state)
from upernet_ref.training.schedule import build_optimizer, build_scheduler

__all__ = ["NonFiniteLossError", "StepLosses", "TrainResult", "train", "train_step"]

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) float, masks (B, H, W) int64


@dataclasses.dataclass(frozen=True)
class StepLosses:
    """The losses of one step, averaged over its micro-batches (and processes): 0-dim tensors.
    `loss` is what was minimised; `loss_out` / `loss_aux` the heads' *unweighted* CEs."""
    loss: torch.Tensor
    loss_out: torch.Tensor
    loss_aux: torch.Tensor


def train_step(model: nn.Module, batch: Batch | typing.Sequence[Batch],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: Config, *,
               distributed: bool = False, check_finite: bool = True) -> StepLosses:
    """Forward, loss, backward over the micro-batches of `batch`, then one optimizer update.

    Args:
        model: the network, possibly wrapped (DistributedDataParallel, torch.compile), in the
            mode the caller wants (the batch probe runs BatchNorm with running statistics).
        batch: one (images, masks) pair, or a sequence of them (gradient accumulation); moved
            to the device of the optimized weights here, one micro-batch at a time.
        scaler: `runtime.grad_scaler(cfg.train.amp, device)` (a no-op unless fp16).
        distributed: average the losses over the processes (every process must call): the
            non-finite check is then the same everywhere.
        check_finite: raise `NonFiniteLossError` before the update on a NaN / inf loss (it
            reads the loss back: False under FakeTensorMode, where values do not exist).
    """
    micro_batches = typing.cast(list[Batch], [batch] if isinstance(batch[0], torch.Tensor)
                                else list(batch))
    count = len(micro_batches)
    device = optimizer.param_groups[0]["params"][0].device
    ddp = next((m for m in (model, getattr(model, "_orig_mod", None))  # also under compile
                if isinstance(m, nn.parallel.DistributedDataParallel)), None)
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
    if distributed:
        sums = all_reduce_sum(sums) / rank_and_world()[1]
    losses = StepLosses(*sums)
    if check_finite and not torch.isfinite(losses.loss).item():
        raise NonFiniteLossError(f"non-finite loss ({losses.loss.item()})")
    scaler.step(optimizer)
    scaler.update()
    return losses


@dataclasses.dataclass
class TrainResult:
    out_dir: Path
    iteration: int  # iterations completed
    max_iters: int
    losses: list[float]  # total loss of every iteration run in this call
    last_checkpoint: Path | None
    val: list[dict] = dataclasses.field(default_factory=list)  # {"iter", "miou", ...}
    interrupted: str | None = None  # what should_stop() said ("SIGTERM", ...) when it stopped
    per_device_batch: int = 0
    accumulation: int = 1
    world_size: int = 1
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # data.on_bad=skip: item -> problem


def every(it: int, interval: int) -> bool:
    """Whether iteration `it` is one of every `interval` (never with an interval of 0)."""
    return bool(interval) and it % interval == 0


NAN_HINT = "Try a lower --train.lr, --train.amp=none, or check the data (upernet data check)"


def train(cfg: Config, model: nn.Module, train_set: torch.utils.data.Dataset,
          val_set: torch.utils.data.Dataset | None, out_dir: str | Path, *,
          save: Callable[[dict, Path], object], device: str | torch.device = "cpu",
          max_iters: int | None = None, stop_at: int | None = None,
          per_device_batch: int | None = None, resume: dict | None = None,
          log: Callable[[dict], None] = lambda record: None, say: Callable[[str], None] = print,
          should_stop: Callable[[], str | None] = lambda: None,
          progress: Callable[[int, float, float], None] = lambda it, loss, lr: None) -> TrainResult:
    """Train `model` with `cfg`'s recipe on `train_set`; checkpoints `out_dir/last.pt`, `best.pt`.

    Args:
        model: the initialised network (weights already loaded); moved to `device` here.
        train_set: items transformed to fixed-size tensors (the published train pipeline).
        val_set: items as `test_transform(cfg.data)` gives them (what `evaluate` takes), or None.
        save: `save(checkpoint_dict, path)`, called on rank 0 (`checkpoints.save_checkpoint`:
            atomic, a full disk said in one line).
        max_iters: schedule length (default `cfg.train.max_iters`); `stop_at`: stop (with a
            checkpoint) after that iteration, keeping the schedule.
        per_device_batch: images per process per micro-step (default: the whole share).
        resume: a checkpoint dict written by this loop, to continue from exactly.
        log: gets every record (`{"kind": "train" | "val" | "data", "iter", ...}`).
        say: gets the run's messages (the first line, notes, the stop).
        should_stop: polled after every iteration; a reason (e.g. "SIGTERM") on any process
            saves `last.pt` and stops every process at that iteration.
        progress: called after every iteration with (iteration, loss, lr).

    Raises:
        NonFiniteLossError: the loss, a weight or a BatchNorm statistic became NaN / inf
            (stopped before that update or save; the last good checkpoint is kept).
    """
    tc, device, out_dir = cfg.train, torch.device(device), Path(out_dir)
    rank, world = rank_and_world()
    max_iters = int(max_iters or tc.max_iters)
    end = min(max_iters, stop_at) if stop_at else max_iters
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    # Set-up. A problem here is the user's input (`upernet train` exits 2).
    with before_work():
        per_device_batch, accumulation, sync_bn = batch_plan(cfg, world, device,
                                                             per_device_batch)
        model, optimizer, scheduler, scaler = build_training(model, cfg, device, sync_bn,
                                                             max_iters)
        say(f"{cfg.name}: global batch {tc.batch_size} = {per_device_batch} per device x {world} "
            f"process(es) x {accumulation} accumulation step(s); {describe(cfg, sync_bn, device)}; "
            f"{max_iters} iterations (poly schedule){f', stopping at {end}' * (end < max_iters)}")
        start, best_miou = restore(resume, model, optimizer, scheduler, scaler, cfg=cfg,
                                   max_iters=max_iters, say=say)
    forward = wrap_for_training(model, cfg, world, device)  # what trains; `model` is saved
    order = GlobalBatchOrder(len(train_set), tc.batch_size, tc.seed)
    items = micro_batches(train_set, cfg, order, per_device_batch, start, device)
    checkpoint = functools.partial(
        save_checkpoint, save, model=model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, cfg=cfg, order=order, max_iters=max_iters, per_device_batch=per_device_batch)
    result = TrainResult(out_dir, start, max_iters, [], last_path if resume else None,
                         per_device_batch=per_device_batch, accumulation=accumulation,
                         world_size=world)
    previous_flags = set_deterministic(tc.deterministic, device)
    window, started = [], time.perf_counter()  # (losses, lr) of each iteration since the last log
    try:
        for it in range(start + 1, end + 1):  # iteration `it`: `it` are done after it
            kept = kept_checkpoint(last_path)  # what a stop for a NaN leaves
            forward.train()
            lr = optimizer.param_groups[0]["lr"]
            try:
                losses = train_step(forward, [next(items) for _ in range(accumulation)],
                                    optimizer, scaler, cfg, distributed=world > 1)
            except NonFiniteLossError as err:  # said with where the run stopped and what is kept
                raise NonFiniteLossError(f"{err} at iteration {it} of {cfg.name}; stopped before "
                                         f"applying that update; {kept}. {NAN_HINT}") from None
            scheduler.step()
            check_finite_state(model, it, kept)  # BatchNorm statistics too, before any save
            reason = should_stop()  # a signal reaching any process stops all at this iteration
            stopping = any_process(reason is not None, device)
            window.append((float(losses.loss), float(losses.loss_out), float(losses.loss_aux), lr))
            result.losses.append(window[-1][0])
            result.iteration = it
            progress(it, window[-1][0], lr)
            if it % tc.log_interval == 0 or it == end:
                log(train_record(window, started, it, end, cfg, len(train_set)))
                window = []
            if stopping:
                result.interrupted = reason or "signal"
                result.last_checkpoint = checkpoint(last_path, it, best_miou)
                say(f"stopped by {result.interrupted} at iteration {it}; checkpoint "
                    f"{last_path}; continue with --resume")
                break
            # The checkpoint comes before the validation: a kill while validating loses no
            # training. The final validation is the one at the schedule's end, not at stop_at.
            due_checkpoint = it == end or every(it, tc.checkpoint_interval)
            if due_checkpoint:
                result.last_checkpoint = checkpoint(last_path, it, best_miou)
            if val_set is not None and (it == max_iters if it == end else every(it, tc.val_interval)):
                result.val.append(validate(model, val_set, cfg, device, it))
                log(result.val[-1])
                if result.val[-1]["miou"] > best_miou:
                    best_miou = result.val[-1]["miou"]
                    checkpoint(best_path, it, best_miou)
                    if due_checkpoint:
                        checkpoint(last_path, it, best_miou)  # so last.pt knows the new best
            if not window:  # speed figures leave out validation and checkpoint time
                started = time.perf_counter()
    finally:
        del items  # stops the DataLoader's worker processes
        restore_deterministic(previous_flags)
    report_skipped(train_set, result, log, say)
    return result


def describe(cfg: Config, sync_bn: bool, device: torch.device) -> str:
    """The normalisation, device and precision of a run, for its first line."""
    return f"{'SyncBN' if sync_bn else 'BatchNorm'}; device {device}; amp {cfg.train.amp}"


def kept_checkpoint(last_path: Path) -> str:
    return (f"the last good checkpoint is {last_path}" if last_path.exists()
            else "no checkpoint was written yet")


def batch_plan(cfg: Config, world: int, device: torch.device,
               per_device_batch: int | None) -> tuple[int, int, bool]:
    """(per-device batch, accumulation steps, SyncBN?) for the global batch on `world`
    processes: SyncBN with several CUDA processes (torch's SyncBatchNorm is CUDA-only)."""
    sync_bn = use_sync_bn(cfg.train.norm, world, device)
    per_device_batch, accumulation = batch_decomposition(cfg.train.batch_size, world,
                                                         per_device_batch)
    if per_device_batch < (1 if sync_bn else 2):  # the PPM's 1x1 bin: 1 value per channel
        raise ValueError("a per-device batch of 1 needs SyncBN over several GPUs: with plain "
                         "BatchNorm the PPM's 1x1 pooled branch normalises a single value per "
                         "channel; use --per-device-batch 2 or more")
    return per_device_batch, accumulation, sync_bn


def build_training(model: nn.Module, cfg: Config, device: torch.device, sync_bn: bool,
                   max_iters: int) -> tuple[nn.Module, torch.optim.Optimizer,
                                            torch.optim.lr_scheduler.LRScheduler,
                                            torch.amp.GradScaler]:
    """The model on its device (channels_last, SyncBN as asked), SGD with the recipe's parameter
    groups, the poly schedule over `max_iters` and the AMP scaler."""
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg.train)
    return (model, optimizer, build_scheduler(optimizer, cfg.train, max_iters),
            grad_scaler(cfg.train.amp, device))


def wrap_for_training(model: nn.Module, cfg: Config, world: int,
                      device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel over several processes, then torch.compile'd with
    `train.compile` (the DDP wrapper is compiled: its all-reduce overlaps the backward pass)."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return typing.cast(nn.Module, torch.compile(model)) if cfg.train.compile else model


def micro_batches(train_set: torch.utils.data.Dataset, cfg: Config, order: GlobalBatchOrder,
                  per_device_batch: int, start: int, device: torch.device) -> typing.Iterator:
    """This process's micro-batches of global batch start + 1, start + 2, ... in the order fixed
    by (seed, iteration) (`data_order`), each item's augmentations seeded by its position."""
    rank, world = rank_and_world()
    return iter(torch.utils.data.DataLoader(  # its own generator: the global RNG is untouched
        SeededItems(train_set, cfg.train.seed), num_workers=cfg.data.num_workers,
        batch_sampler=MicroBatchSampler(order, rank, world, per_device_batch, start),
        pin_memory=device.type == "cuda", generator=torch.Generator()))


def report_skipped(train_set: torch.utils.data.Dataset, result: TrainResult,
                   log: Callable[[dict], None], say: Callable[[str], None]) -> None:
    """The samples skipped with data.on_bad=skip (every worker, every rank): kept in `result`,
    logged and said."""
    result.skipped = skipped_samples(train_set)
    if result.skipped:
        log({"kind": "data", "iter": result.iteration, "skipped": len(result.skipped),
             "skipped_samples": result.skipped})
        say(f"skipped {len(result.skipped)} bad training sample(s) (data.on_bad=skip), listed "
            f"in the run's log; first: {next(iter(result.skipped.values()))}")


def train_record(window: list[tuple[float, float, float, float]], started: float, it: int,
                 end: int, cfg: Config, images: int) -> dict:
    """The `log.jsonl` record of the iterations in `window`: mean losses, last lr, speed."""
    loss, loss_out, loss_aux, _ = (sum(v) / len(window) for v in zip(*window))
    seconds = (time.perf_counter() - started) / len(window)
    batch = cfg.train.batch_size
    return {"kind": "train", "iter": it, "epoch": round(it * batch / images, 4), "loss": loss,
            "loss_out": loss_out, "loss_aux": loss_aux, "lr": window[-1][3],
            "sec_per_iter": seconds, "img_per_sec": batch / max(seconds, 1e-9),
            "eta_sec": seconds * (end - it)}


def validate(model: nn.Module, val_set: torch.utils.data.Dataset, cfg: Config,
             device: torch.device, it: int) -> dict:
    """The `log.jsonl` record of the model's mIoU on `val_set` (the training RNG untouched)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics = evaluate(model, val_set, cfg, device, progress=None)
    return {"kind": "val", "iter": it, "miou": metrics["miou"], "macc": metrics.get("macc"),
            "aacc": metrics.get("aacc")}


def save_checkpoint(save: Callable[[dict, Path], object], path: Path, it: int,
                    best_miou: float, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, cfg: Config, order: GlobalBatchOrder,
                    max_iters: int, per_device_batch: int) -> Path:
    """Everything an exact continuation needs, with every process's RNG state, `save`d by
    rank 0 (every process calls: the RNG states are gathered)."""
    states = all_gather_object(rng_state())
    rank, world = rank_and_world()
    if rank == 0:
        epoch, position = order.position(it)
        save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
              "rng": states, "iteration": it, "max_iters": max_iters, "epoch": epoch,
              "position": position, "best_miou": best_miou, "world_size": world,
              "per_device_batch": per_device_batch, "config": configs.to_dict(cfg)}, path)
    barrier()
    return path


def restore(ckpt: dict | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, *,
            cfg: Config, max_iters: int, say: Callable[[str], None]) -> tuple[int, float]:
    """Load a checkpoint of `train` for an exact continuation; returns (iteration, best mIoU),
    (0, -1) for a fresh start (`ckpt` None).

    The schedule and SGD's settings are those of `cfg` (the poly lr of its lr, min_lr, power,
    warmup and `max_iters` at the saved iteration), so an override given at resume is applied,
    not announced and ignored; another number of processes keeps the data order (it depends on
    the iteration only) but restarts the random streams.
    """
    rank, world = rank_and_world()
    if ckpt is None:  # a fresh start: a different dropout stream on each process
        torch.manual_seed(cfg.train.seed + rank)
        return 0, -1.0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    tc, start = cfg.train, int(ckpt["iteration"])
    for group in optimizer.param_groups:  # SGD as configured now, not as saved
        group.update(momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=tc.nesterov, initial_lr=tc.lr)
    scheduler.last_epoch = start  # the optimizer holds the saved schedule's next lr: recompute
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt.get("rng", [])
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        say(f"note: checkpoint from {len(states)} process(es), now {world}: the random state "
            f"(dropout) restarts; data order and augmentations are unchanged")
        seed_everything(cfg.train.seed + 1000 * start + rank)
    return start, float(ckpt.get("best_miou", -1.0))
