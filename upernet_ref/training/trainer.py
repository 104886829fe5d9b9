"""`upernet train`: the published recipe (docs/SPEC.md, "Training recipe") on a CPU, one GPU or
many.

    upernet train --config upernet_small_demo                     # CPU, minutes
    upernet train --config upernet_r50_os8_ade20k --data-root data/ade --train.lr=0.02
    torchrun --nproc_per_node=8 -m upernet_ref.cli train --config upernet_r50_os8_ade20k ...
    upernet train --config ... --out runs/x --resume              # continue from runs/x/last.pt

One loop for every setup (nanoGPT-style, no callbacks), read top to bottom in `train()`: build
the model and the batch decomposition, the data, resume, then per iteration one
`step.train_step` on this process's micro-batches of the global batch
(`distributed.GlobalBatchOrder`; DDP synchronises on the last one, the loss is checked finite on
every process before the update) and one poly-schedule step, then log, checkpoint, validate.
The global batch (16, or 8 for Cityscapes) is kept whatever the hardware: per-device batch x
processes x accumulation steps. SyncBN is used with several CUDA processes, plain BN in one
process or on CPU (`train.norm="auto"`; torch's SyncBatchNorm is CUDA-only).

Everything needed to continue exactly is checkpointed atomically to `out/last.pt`: weights,
optimizer (momentum), scheduler, AMP scaler, RNG states of every process and the iteration
(which fixes the data order and the augmentations). SIGTERM / SIGINT save a checkpoint and
stop; a non-finite loss stops *before* the update, leaving the last good checkpoint in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
import typing
from pathlib import Path

import torch
from torch import nn

from upernet_ref import configs
from upernet_ref.checkpoints import (load_backbone_weights, load_weights, read_checkpoint_file,
                                     remove_stale_temporary_files, save_checkpoint)
from upernet_ref.configs import Config
from upernet_ref.errors import before_work
from upernet_ref.files import write_text
from upernet_ref.model.upernet import build_model
from upernet_ref.collectives import (DistInfo, all_gather_object, all_reduce_max, all_reduce_sum, barrier, cleanup, init_distributed, use_sync_bn)
from upernet_ref.training.data_order import (GlobalBatchOrder, MicroBatchSampler, SeededItems, batch_decomposition)
from upernet_ref.runs import RunLogger
from upernet_ref.runs import StopFlag, run_folder_lock
from upernet_ref.training.runtime import (check_finite_state, deterministic_mode, rng_state, seed_everything, set_rng_state)
from upernet_ref.perf.batch_probe import choose_per_device_batch
from upernet_ref.training.schedule import PolyLR, build_optimizer, build_scheduler
from upernet_ref.training.step import NonFiniteLossError, StepLosses, train_step

__all__ = ["NonFiniteLossError", "TrainResult", "train"]

Say = typing.Callable[[str], None]


@dataclasses.dataclass
class TrainResult:
    out_dir: Path
    iteration: int  # iterations completed
    max_iters: int
    losses: list[float]  # total loss of every iteration run in this call
    last_checkpoint: Path | None
    val: list[dict] = dataclasses.field(default_factory=list)  # {"iter", "miou", ...}
    interrupted: str | None = None  # "SIGTERM" / "SIGINT" when stopped by a signal
    per_device_batch: int = 0
    accumulation: int = 1
    world_size: int = 1
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # data.on_bad=skip: item -> problem


@dataclasses.dataclass
class Run:
    """What a training run holds from one iteration to the next (and checkpoints)."""
    cfg: Config
    info: DistInfo
    out_dir: Path
    model: nn.Module  # what is saved and evaluated
    forward_model: nn.Module  # the same model, wrapped by DDP and/or torch.compile: what trains
    optimizer: torch.optim.Optimizer
    scheduler: PolyLR
    scaler: torch.amp.GradScaler
    per_device_batch: int
    accumulation: int
    sync_bn: bool
    max_iters: int
    order: GlobalBatchOrder
    iteration: int = 0
    best_miou: float = -1.0

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"


@dataclasses.dataclass
class LossWindow:
    """The running sums of the losses since the last log line, and when that line was."""
    loss: float = 0.0
    loss_out: float = 0.0
    loss_aux: float = 0.0
    iterations: int = 0
    lr: float = 0.0  # the learning rate of the last iteration
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, losses: StepLosses, lr: float) -> None:
        self.loss += float(losses.loss)
        self.loss_out += float(losses.loss_out)
        self.loss_aux += float(losses.loss_aux)
        self.iterations += 1
        self.lr = lr


# --------------------------------------------------------------------------------------------
# The trainer


def train(cfg: Config | str, data_root: str | None = None, out_dir: str | Path | None = None,
          resume: bool | str = False, device: str | None = None,
          per_device_batch: int | None = None, max_iters: int | None = None,
          stop_at: int | None = None, weights: str | None = None,
          backbone_weights: str | None = None, progress: bool | None = None,
          train_dataset: torch.utils.data.Dataset | None = None,
          val_dataset: torch.utils.data.Dataset | None = None, validate: bool = True,
          handle_signals: bool = True, tensorboard: bool = True,
          log: Say | None = None, reinit_classifier: bool = False,
          trust_checkpoint: bool = False) -> TrainResult:
    """Train `cfg` and return what happened (see `TrainResult`).

    Args:
        cfg: a Config or configuration name.
        data_root: dataset folder (not needed for the demo data).
        out_dir: where `last.pt`, `best.pt`, `log.jsonl`, `curves.png`, `tb/` go
            (default `runs/<config name>`).
        resume: True: continue from `out_dir/last.pt` if it exists; a path: from that file.
        device: "auto" (default), "cpu", "cuda", "cuda:1", ...
        per_device_batch: images per process per micro-step (default: the largest that fits).
        max_iters: schedule length (default `cfg.train.max_iters` = epochs x iters/epoch).
        stop_at: stop (with a checkpoint) after this iteration, keeping the schedule of
            `max_iters` (a time-limited job, or the first half of a resume test).
        weights: initialise the whole model from a checkpoint, a Hugging Face folder or a
            `.safetensors` file (fine-tuning).
        backbone_weights: initialise the backbone from ImageNet weights (as published).
        reinit_classifier: with `weights`, load all but the two classifiers and re-initialise
            those for `cfg`'s classes (fine-tuning into another label set).
        trust_checkpoint: open checkpoints that `torch.load(weights_only=True)` refuses with the
            full unpickler (runs code from the file; see `checkpoints.read_checkpoint_file`).
        progress: tqdm bar (default: on rank 0 when stderr is a terminal).
        train_dataset / val_dataset: use these instead of `cfg.data` (tests, notebooks); the
            train set must return transformed fixed-size items, the val set items as
            `test_transform(cfg.data)` gives them (what `evaluate` takes).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the update was not applied).
    """
    cfg = configs.get_config(cfg)
    max_iters = int(max_iters or cfg.train.max_iters)
    end = min(max_iters, stop_at) if stop_at else max_iters
    out_dir = Path(out_dir or Path("runs") / cfg.name)
    with before_work():  # a bad --device or torchrun environment
        info = init_distributed(device)
    say = (log or _print) if info.is_main else _quiet
    with contextlib.ExitStack() as on_exit:  # run last to first when train() returns or raises
        on_exit.callback(cleanup, info)
        on_exit.enter_context(deterministic_mode(cfg.train.deterministic, info.device))
        on_exit.enter_context(run_folder_lock(out_dir, info.is_main))  # one run per folder
        seed_everything(cfg.train.seed)  # same initial weights on every process
        # Everything up to the first step is set-up: a problem here (data folder, weights,
        # resume) is the user's input, reported by `upernet train` with exit status 2.
        with before_work():
            train_set, val_set = datasets(cfg, data_root, train_dataset, val_dataset, say=say)
            for stale in remove_stale_temporary_files(out_dir) if info.is_main else []:
                say(f"removed {stale}, the temporary file of a checkpoint save that was interrupted")
            run = build_run(cfg, info, out_dir=out_dir, max_iters=max_iters,
                            per_device_batch=per_device_batch, weights=weights,
                            backbone_weights=backbone_weights, train_size=len(train_set),
                            reinit_classifier=reinit_classifier, trust=trust_checkpoint, say=say)
            say(describe(run, end=end))
            resumed = resume_run(run, resume=resume, trust=trust_checkpoint, say=say)
            run.forward_model = wrap_for_training(run.model, cfg=cfg, info=info)
            batches = GlobalBatches(train_set, run)
        on_exit.callback(batches.close)
        logger = start_logger(run, resumed=resumed, tensorboard=tensorboard)
        on_exit.callback(logger.close)
        on_exit.callback(logger.plot, cfg.name)
        stop = StopFlag(handle_signals)
        on_exit.callback(stop.restore)
        bar = progress_bar(run, end=end, show=progress)
        on_exit.callback(bar.close)
        result = TrainResult(out_dir, run.iteration, max_iters, [],
                             run.last_path if resumed else None,
                             per_device_batch=run.per_device_batch,
                             accumulation=run.accumulation, world_size=info.world_size)
        window = LossWindow()
        while run.iteration < end:
            losses, lr = take_step(run, batches)
            stopping = stop_requested_anywhere(stop, info)
            window.add(losses, lr)
            result.losses.append(float(losses.loss))
            result.iteration = run.iteration
            bar.update(float(losses.loss), lr)
            if run.iteration % cfg.train.log_interval == 0 or run.iteration == end:
                log_train(run, window, logger, end=end, images=len(train_set),
                          say=_quiet if bar.shown else say)
                window = LossWindow()
            if stopping:  # a signal reached some process: all stop together
                result.last_checkpoint = save_training_state(run)
                result.interrupted = signal.Signals(stop.signum).name if stop.signum else "signal"
                say(f"stopped by {result.interrupted} at iteration {run.iteration}; checkpoint "
                    f"{run.last_path}; continue with --resume")
                break
            checkpoint_and_validate(run, result, logger, val_set=val_set if validate else None,
                                    end=end, say=say)
            if window.iterations == 0:  # speed figures leave out validation and checkpoint time
                window.started = time.perf_counter()
        result.skipped = report_skipped(train_set, logger, iteration=run.iteration, say=say)
        return result


# --------------------------------------------------------------------------------------------
# The named steps of `train()`


def _print(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    pass


def build_datasets(cfg: Config, data_root: str | None):
    """(train set with the published train pipeline, val set with the test pipeline, or None)."""
    from upernet_ref.data.datasets import build_dataset
    from upernet_ref.data.transforms import test_transform, train_transform

    train_set = build_dataset(cfg, cfg.data.train_split, data_root, train_transform(cfg.data),
                              on_bad=cfg.data.on_bad)
    try:
        val_set = build_dataset(cfg, cfg.data.val_split, data_root, test_transform(cfg.data))
    except (FileNotFoundError, ValueError) as err:
        print(f"note: no validation set ({err}); training without validation", file=sys.stderr)
        val_set = None
    return train_set, val_set


def datasets(cfg: Config, data_root: str | None, train_dataset, val_dataset, *, say: Say):
    """The given (train, val) sets, or those of `cfg.data` (`build_datasets`)."""
    given_val = val_dataset is not None
    if train_dataset is None:
        if data_root and cfg.data.dataset == "demo":
            say(f"note: --data-root {data_root} is not used: {cfg.name} trains on the embedded "
                f"demo scenes")
        train_dataset, built_val = build_datasets(cfg, data_root)
        val_dataset = val_dataset if val_dataset is not None else built_val
    if given_val and len(val_dataset) > 0:  # a raw one is refused now, not at validation
        from upernet_ref.evaluation.evaluate import check_test_form
        check_test_form(val_dataset[0][0])
    if len(train_dataset) == 0:
        raise ValueError(f"the training set of {cfg.name} is empty")
    return train_dataset, val_dataset


def build_run(cfg: Config, info: DistInfo, *, out_dir: Path, max_iters: int,
              per_device_batch: int | None, weights: str | None, backbone_weights: str | None,
              train_size: int, reinit_classifier: bool, trust: bool, say: Say) -> Run:
    """The model (initial weights loaded, on the device, SyncBN where several GPUs train), the
    batch decomposition, SGD, the poly schedule and the AMP scaler."""
    tc, dev = cfg.train, info.device
    model = build_model(cfg)
    if backbone_weights:
        load_backbone_weights(model, backbone_weights, trust=trust)
    if weights:
        load_weights(model, weights, reinit_classifier=reinit_classifier, trust=trust, log=say)
    model.to(dev)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    sync_bn = use_sync_bn(tc.norm, info.world_size, dev)
    per_device_batch, accumulation = decompose_batch(model, cfg, info, per_device_batch,
                                                     sync_bn=sync_bn)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, tc)
    return Run(cfg=cfg, info=info, out_dir=out_dir, model=model, forward_model=model,
               optimizer=optimizer, scheduler=build_scheduler(optimizer, tc, max_iters),
               scaler=torch.amp.GradScaler(dev.type, enabled=tc.amp == "fp16"),
               per_device_batch=per_device_batch, accumulation=accumulation, sync_bn=sync_bn,
               max_iters=max_iters, order=GlobalBatchOrder(train_size, tc.batch_size, tc.seed))


def decompose_batch(model: nn.Module, cfg: Config, info: DistInfo, per_device_batch: int | None,
                    *, sync_bn: bool) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for the global batch: the given per-device batch,
    or the largest that fits (`runtime.choose_per_device_batch`), the same on every process."""
    tc = cfg.train
    share = batch_decomposition(tc.batch_size, info.world_size)[0]
    # Plain BN needs 2 images: the PPM's 1x1 pooled branch has one value per channel per image.
    smallest = 1 if sync_bn else 2
    if per_device_batch is None:
        per_device_batch = choose_per_device_batch(model, cfg, info.device, share, smallest)
        if info.distributed:  # every process must use the same: take the smallest
            t = torch.tensor([-per_device_batch], device=info.device)
            per_device_batch = -int(all_reduce_max(t).item())
    per_device_batch, accumulation = batch_decomposition(tc.batch_size, info.world_size,
                                                         per_device_batch)
    if per_device_batch < smallest:
        raise ValueError("a per-device batch of 1 needs SyncBN over several GPUs: with plain "
                         "BatchNorm the PPM's 1x1 pooled branch normalises a single value per "
                         "channel; use --per-device-batch 2 or more")
    return per_device_batch, accumulation


def describe(run: Run, *, end: int) -> str:
    """The run's first line: batch decomposition, normalisation, device, schedule."""
    tc = run.cfg.train
    stopping = f", stopping at {end}" if end < run.max_iters else ""
    return (f"{run.cfg.name}: global batch {tc.batch_size} = {run.per_device_batch} per device x "
            f"{run.info.world_size} process(es) x {run.accumulation} accumulation step(s); "
            f"{'SyncBN' if run.sync_bn else 'BatchNorm'}; device {run.info.device}; amp {tc.amp}; "
            f"{run.max_iters} iterations (poly schedule){stopping}")


def resume_run(run: Run, *, resume: bool | str | Path, trust: bool, say: Say) -> bool:
    """Restore the checkpoint `resume` names into `run` (True), or start afresh (False)."""
    path = _checkpoint_to_resume(resume, run.last_path, say)
    if path is None:
        torch.manual_seed(run.cfg.train.seed + run.info.rank)  # a different dropout stream
        return False  # on each process
    run.iteration, run.best_miou = restore_training_state(path, run, trust=trust, say=say)
    return True


def wrap_for_training(model: nn.Module, *, cfg: Config, info: DistInfo) -> nn.Module:
    """`model` in DistributedDataParallel over several processes, then torch.compile'd when
    `train.compile` (the DDP wrapper is compiled, not the inner model: then the gradient
    all-reduce overlaps the backward pass)."""
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if cfg.train.compile else model


class GlobalBatches:
    """This process's micro-batches of each global batch, in the order fixed by (seed, iteration)
    from the run's iteration on (`distributed.MicroBatchSampler`)."""

    def __init__(self, dataset: torch.utils.data.Dataset, run: Run):
        tc, dev = run.cfg.train, run.info.device
        sampler = MicroBatchSampler(run.order, run.info.rank, run.info.world_size,
                                    run.per_device_batch, run.iteration)
        loader = torch.utils.data.DataLoader(
            SeededItems(dataset, tc.seed), batch_sampler=sampler,
            num_workers=run.cfg.data.num_workers, pin_memory=dev.type == "cuda",
            generator=torch.Generator())  # its own generator: the global RNG (dropout) is untouched
        self.accumulation = run.accumulation
        self._items: typing.Iterator | None = iter(loader)

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [next(self._items) for _ in range(self.accumulation)]

    def close(self) -> None:
        self._items = None  # stops the loader's worker processes


def start_logger(run: Run, *, resumed: bool, tensorboard: bool) -> RunLogger:
    """The run's `log.jsonl` (and TensorBoard) on rank 0, with `config.json` next to it."""
    logger = RunLogger(run.out_dir, enabled=run.info.is_main, tensorboard=tensorboard,
                       resume_from=run.iteration if resumed else None)
    if run.info.is_main:
        write_text(run.out_dir / "config.json", json.dumps(configs.to_dict(run.cfg), indent=2))
    return logger


class _Bar:
    """A tqdm bar on rank 0 when shown, otherwise nothing."""

    def __init__(self, bar=None):
        self.bar = bar
        self.shown = bar is not None

    def update(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(run: Run, *, end: int, show: bool | None) -> _Bar:
    """A progress bar (default: on rank 0 when stderr is a terminal); without it, log lines."""
    if not run.info.is_main or not (show if show is not None else sys.stderr.isatty()):
        return _Bar()
    from tqdm import tqdm
    return _Bar(tqdm(total=end, initial=run.iteration, desc=run.cfg.name, unit="it",
                     dynamic_ncols=True))


def take_step(run: Run, batches: GlobalBatches) -> tuple[StepLosses, float]:
    """One iteration: `step.train_step` on the next global batch, then the schedule's step.
    Returns the step's losses and the learning rate it used."""
    run.forward_model.train()
    lr = run.optimizer.param_groups[0]["lr"]
    try:
        losses = train_step(run.forward_model, batches.next(), run.optimizer, run.scaler,
                            run.cfg, distributed=run.info.distributed)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(
            f"{err} at iteration {run.iteration + 1} of {run.cfg.name}; stopped before applying "
            f"that update; {_kept(run)}. Try a lower --train.lr, --train.amp=none, or check the "
            f"data (upernet data check)") from None
    run.scheduler.step()
    run.iteration += 1
    check_finite_state(run.model, run.iteration, _kept(run))  # BN statistics too, before any save
    return losses, lr


def _kept(run: Run) -> str:
    """Which checkpoint a stopped run leaves, for its message."""
    return (f"the last good checkpoint is {run.last_path}" if run.last_path.exists()
            else "no checkpoint was written yet")


def report_skipped(train_set, logger: RunLogger, *, iteration: int, say: Say) -> dict[str, str]:
    """The samples skipped with data.on_bad=skip (every worker, every rank): said, and logged."""
    from upernet_ref.data.datasets import skipped_samples
    skipped = skipped_samples(train_set)
    if skipped:
        logger.log({"kind": "data", "iter": iteration, "skipped": len(skipped),
                    "skipped_samples": skipped})
        say(f"skipped {len(skipped)} bad training sample(s) (data.on_bad=skip), listed in "
            f"{logger.path}; first: {next(iter(skipped.values()))}")
    return skipped


def stop_requested_anywhere(stop: StopFlag, info: DistInfo) -> bool:
    """Whether a SIGTERM / SIGINT reached any process (all must stop at the same iteration)."""
    flag = torch.tensor([float(stop.signum != 0)], device=info.device)
    return all_reduce_sum(flag).item() > 0


def log_train(run: Run, window: LossWindow, logger: RunLogger, *, end: int, images: int,
              say: Say) -> None:
    """One `log.jsonl` record (and line) with the window's mean losses and speed."""
    it, tc = run.iteration, run.cfg.train
    n = max(window.iterations, 1)
    sec_per_iter = (time.perf_counter() - window.started) / n
    epoch = it * tc.batch_size / images
    record = {"kind": "train", "iter": it, "epoch": round(epoch, 4), "loss": window.loss / n,
              "loss_out": window.loss_out / n, "loss_aux": window.loss_aux / n, "lr": window.lr,
              "sec_per_iter": sec_per_iter,
              "img_per_sec": tc.batch_size / max(sec_per_iter, 1e-9),
              "eta_sec": sec_per_iter * (end - it)}
    logger.log(record)
    stopping = f" (stop at {end})" if end < run.max_iters else ""
    say(f"iter {it}/{run.max_iters}{stopping}  epoch {epoch:.2f}  loss {record['loss']:.4f}  "
        f"lr {window.lr:.3e}  {record['img_per_sec']:.1f} img/s  "
        f"eta {record['eta_sec'] / 60:.1f} min")


def checkpoint_and_validate(run: Run, result: TrainResult, logger: RunLogger, *,
                            val_set: torch.utils.data.Dataset | None, end: int, say: Say) -> None:
    """The periodic (and final) checkpoint and validation of this iteration.

    The checkpoint comes before the validation: a failure or a kill while validating loses no
    training. The final validation is the one at the end of the schedule, not at `stop_at`.
    """
    it, tc = run.iteration, run.cfg.train
    at_end = it == end
    due_checkpoint = at_end or bool(tc.checkpoint_interval and it % tc.checkpoint_interval == 0)
    due_val = val_set is not None and (
        (it == run.max_iters) if at_end else bool(tc.val_interval and it % tc.val_interval == 0))
    if due_checkpoint:
        result.last_checkpoint = save_training_state(run)
    if due_val:
        best_before = run.best_miou
        result.val.append(validate_and_keep_best(run, val_set, logger, say=say))
        if due_checkpoint and run.best_miou != best_before:
            save_training_state(run)  # so that last.pt knows the new best mIoU
    if due_checkpoint and not at_end:
        logger.plot(run.cfg.name)


def validate_and_keep_best(run: Run, val_set: torch.utils.data.Dataset, logger: RunLogger, *,
                           say: Say) -> dict:
    """Evaluate the model on `val_set` (the training RNG untouched), log it, and save `best.pt`
    when the mIoU is the best so far."""
    from upernet_ref.evaluation.evaluate import evaluate
    dev = run.info.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        res = evaluate(run.model, val_set, run.cfg, dev, progress=False)
    record = {"kind": "val", "iter": run.iteration, "miou": res["miou"], "macc": res.get("macc"),
              "aacc": res.get("aacc")}
    logger.log(record)
    say(f"iter {run.iteration}: val mIoU {100 * res['miou']:.2f}%")
    if res["miou"] > run.best_miou:
        run.best_miou = res["miou"]
        save_training_state(run, run.best_path)
    return record


# --------------------------------------------------------------------------------------------
# Checkpoints of the training state


def save_training_state(run: Run, path: Path | None = None) -> Path:
    """Write everything an exact continuation needs to `path` (default `last.pt`), atomically,
    from rank 0, with every process's RNG state."""
    path = path or run.last_path
    states = all_gather_object(rng_state())  # every process's RNG, for an exact resume
    if run.info.is_main:
        epoch, position = run.order.position(run.iteration)
        save_checkpoint({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "rng": states, "iteration": run.iteration, "max_iters": run.max_iters,
            "epoch": epoch, "position": position, "best_miou": run.best_miou,
            "world_size": run.info.world_size, "per_device_batch": run.per_device_batch,
            "config": configs.to_dict(run.cfg),
        }, path)
    barrier()
    return path


def _checkpoint_to_resume(resume: bool | str | Path, last_path: Path, say: Say) -> Path | None:
    """The checkpoint `--resume` means: `last_path` (if it exists yet) or the given file."""
    if not resume:
        return None
    if isinstance(resume, (str, Path)):
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        return path
    if not last_path.exists():
        say(f"--resume: no checkpoint at {last_path} yet, starting from scratch")
        return None
    return last_path


def restore_training_state(path: Path, run: Run, *, say: Say,
                           trust: bool = False) -> tuple[int, float]:
    """Load a trainer checkpoint into `run` for an exact continuation; returns (iteration, best
    mIoU).

    Weights, momentum, schedule position, AMP scale and this process's RNG state are restored.
    A different `max_iters` continues on the new poly curve from the saved iteration; a different
    number of processes keeps the data order (it depends on the iteration only) but restarts the
    random streams.
    """
    cfg, info, max_iters = run.cfg, run.info, run.max_iters
    ckpt = read_checkpoint_file(path, trust)
    if not all(key in ckpt for key in ("model", "optimizer", "scheduler", "iteration")):
        raise ValueError(f"{path}: not a training checkpoint (no optimizer and schedule state "
                         f"to continue from); to start from its weights use --weights {path}")
    saved_cfg = ckpt.get("config", {})
    if saved_cfg.get("model") != configs.to_dict(cfg)["model"]:
        raise ValueError(f"{path}: the checkpoint's model configuration differs from "
                         f"{cfg.name}'s; resume with the same --config and model overrides")
    if saved_cfg != configs.to_dict(cfg):
        say(f"warning: {path} was saved with a different configuration; continuing "
            f"with the one given now")
    if ckpt.get("max_iters", max_iters) != max_iters:
        say(f"warning: the checkpoint's schedule had {ckpt['max_iters']} iterations, now {max_iters}")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scheduler.max_iters = max_iters
    # the optimizer holds the next lr of the *saved* schedule; recompute it for this one
    for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_lr()):
        group["lr"] = lr
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    start = int(ckpt["iteration"])
    if start > max_iters:
        raise ValueError(f"{path} is at iteration {start}, beyond a schedule of {max_iters} "
                         f"iterations: resume with --max-iters {start} or more")
    states = ckpt.get("rng", [])
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])
    else:
        say(f"note: checkpoint from {len(states)} process(es), now {info.world_size}: the "
            f"random state (dropout) restarts; data order and augmentations are unchanged")
        seed_everything(cfg.train.seed + 1000 * start + info.rank)
    say(f"resumed from {path} at iteration {start}")
    return start, float(ckpt.get("best_miou", -1.0))
