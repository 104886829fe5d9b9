"""`upernet train`: the published recipe (spec section 3) on a CPU, one GPU or many.

    upernet train --config upernet_small_demo                     # CPU, minutes
    upernet train --config upernet_r50_os8_ade20k --data-root data/ade --train.lr=0.02
    torchrun --nproc_per_node=8 -m upernet_ref.cli train --config upernet_r50_os8_ade20k ...
    upernet train --config ... --out runs/x --resume              # continue from runs/x/last.pt

One loop for every setup (nanoGPT-style, no callbacks): per iteration, each process runs its
micro-batches of the global batch (`distributed.GlobalBatchOrder`), accumulating gradients
(DDP synchronises on the last one), checks that the loss is finite on every process, then takes
one SGD step and one poly-schedule step. The global batch (16, or 8 for Cityscapes) is kept
whatever the hardware: per-device batch x processes x accumulation steps. SyncBN is used with
several CUDA processes, plain BN in one process or on CPU (`train.norm="auto"`; torch's
SyncBatchNorm is CUDA-only).

Everything needed to continue exactly is checkpointed atomically to `out/last.pt`: weights,
optimizer (momentum), scheduler, AMP scaler, RNG states of every process and the iteration
(which fixes the data order and the augmentations). SIGTERM / SIGINT save a checkpoint and
stop; a non-finite loss stops *before* the update, leaving the last good checkpoint in place.
"""
from __future__ import annotations

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
from upernet_ref.checkpoints import load_backbone_weights, load_weights, read_checkpoint_file, save_checkpoint
from upernet_ref.configs import Config
from upernet_ref.errors import before_work
from upernet_ref.training.distributed import (DistInfo, GlobalBatchOrder, MicroBatchSampler, SeededItems,
                          all_gather_object, all_reduce_max, all_reduce_sum, barrier,
                          batch_decomposition, cleanup, init_distributed, use_sync_bn)
from upernet_ref.training.logs import RunLogger
from upernet_ref.model.upernet import build_model
from upernet_ref.training.runtime import (StopFlag, choose_per_device_batch, deterministic_mode, rng_state,
                      seed_everything, set_rng_state)
from upernet_ref.training.schedule import build_optimizer, build_scheduler
from upernet_ref.training.step import NonFiniteLossError, train_step


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


def build_datasets(cfg: Config, data_root: str | None):
    """(train set with the published train pipeline, raw val set or None)."""
    from upernet_ref.data.datasets import build_dataset
    from upernet_ref.data.transforms import train_transform

    train_set = build_dataset(cfg, cfg.data.train_split, data_root, train_transform(cfg.data))
    try:
        val_set = build_dataset(cfg, cfg.data.val_split, data_root, None)
    except (FileNotFoundError, ValueError) as err:
        print(f"note: no validation set ({err}); training without validation", file=sys.stderr)
        val_set = None
    return train_set, val_set


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
          log: typing.Callable[[str], None] | None = None, reinit_classifier: bool = False,
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
        progress: tqdm bar (default: on rank 0 when stderr is a terminal).
        train_dataset / val_dataset: use these instead of `cfg.data` (tests, notebooks); the
            train set must return transformed fixed-size items.
        reinit_classifier: with `weights`, load all but the two classifiers and re-initialise
            those for `cfg`'s classes (fine-tuning into another label set).
        trust_checkpoint: open checkpoints that `torch.load(weights_only=True)` refuses with the
            full unpickler (runs code from the file; see `checkpoints.read_checkpoint_file`).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the update was not applied).
    """
    cfg = configs.get_config(cfg)
    out_dir = Path(out_dir or Path("runs") / cfg.name)
    with before_work():  # a bad --device or torchrun environment
        info = init_distributed(device)
    try:
        with deterministic_mode(cfg.train.deterministic, info.device):
                return _train(cfg, info, data_root, out_dir, resume, per_device_batch, max_iters,
                          stop_at, weights, backbone_weights, progress, train_dataset,
                          val_dataset, validate, handle_signals, tensorboard, log,
                          reinit_classifier, trust_checkpoint)
    finally:
        cleanup(info)


def _train(cfg: Config, info: DistInfo, data_root, out_dir: Path, resume, per_device_batch,
           max_iters, stop_at, weights, backbone_weights, progress, train_dataset, val_dataset,
           validate, handle_signals, tensorboard, log, reinit_classifier=False,
           trust_checkpoint=False) -> TrainResult:
    tc, dev = cfg.train, info.device
    log = log or (lambda message: print(message, flush=True))
    say = log if info.is_main else (lambda *_: None)
    max_iters = int(max_iters or tc.max_iters)
    end = min(max_iters, stop_at) if stop_at else max_iters
    seed_everything(tc.seed)  # same initial weights on every process

    # Everything up to the first step is set-up: a problem here (data folder, weights, resume)
    # is the user's input, reported by `upernet train` with exit status 2.
    with before_work():
        # ---- data
        if train_dataset is None:
            if data_root and cfg.data.dataset == "demo":
                say(f"note: --data-root {data_root} is not used: {cfg.name} trains on the embedded "
                    f"demo scenes")
            train_dataset, built_val = build_datasets(cfg, data_root)
            val_dataset = val_dataset if val_dataset is not None else built_val
        if len(train_dataset) == 0:
            raise ValueError(f"the training set of {cfg.name} is empty")

        # ---- model, batch decomposition
        model = build_model(cfg)
        if backbone_weights:
            load_backbone_weights(model, backbone_weights, trust=trust_checkpoint)
        if weights:
            load_weights(model, weights, reinit_classifier=reinit_classifier,
                         trust=trust_checkpoint, log=say)
        model.to(dev)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        share = batch_decomposition(tc.batch_size, info.world_size)[0]
        sync_bn = use_sync_bn(tc.norm, info.world_size, dev)
        # Plain BN needs 2 images: the PPM's 1x1 pooled branch has one value per channel per image.
        smallest = 1 if sync_bn else 2
        if per_device_batch is None:
            per_device_batch = choose_per_device_batch(model, cfg, dev, share, smallest)
            if info.distributed:  # every process must use the same: take the smallest
                t = torch.tensor([-per_device_batch], device=dev)
                per_device_batch = -int(all_reduce_max(t).item())
        per_device_batch, accum = batch_decomposition(tc.batch_size, info.world_size, per_device_batch)
        if per_device_batch < smallest:
            raise ValueError("a per-device batch of 1 needs SyncBN over several GPUs: with plain "
                             "BatchNorm the PPM's 1x1 pooled branch normalises a single value per "
                             "channel; use --per-device-batch 2 or more")
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        say(f"{cfg.name}: global batch {tc.batch_size} = {per_device_batch} per device x "
            f"{info.world_size} process(es) x {accum} accumulation step(s); "
            f"{'SyncBN' if sync_bn else 'BatchNorm'}; device {dev}; amp {tc.amp}; "
            f"{max_iters} iterations (poly schedule){f', stopping at {end}' if end < max_iters else ''}")

        optimizer = build_optimizer(model, tc)
        scheduler = build_scheduler(optimizer, tc, max_iters)
        scaler = torch.amp.GradScaler(dev.type, enabled=tc.amp == "fp16")

        # ---- resume
        last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
        ckpt_path = _checkpoint_to_resume(resume, last_path, say)
        if ckpt_path is not None:
            start, best_miou = restore_training_state(ckpt_path, cfg, info, max_iters, model,
                                                      optimizer, scheduler, scaler, say,
                                                      trust_checkpoint)
        else:
            start, best_miou = 0, -1.0
            torch.manual_seed(tc.seed + info.rank)  # a different dropout stream on each process

        raw_model = model  # what is saved and evaluated
        forward_model: nn.Module = model
        if info.distributed:
            forward_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if tc.compile:  # compile the DDP wrapper, not the inner model: then the gradient
            forward_model = torch.compile(forward_model)  # all-reduce overlaps the backward pass

    # ---- data order: fixed by (seed, iteration)
    order = GlobalBatchOrder(len(train_dataset), tc.batch_size, tc.seed)
    sampler = MicroBatchSampler(order, info.rank, info.world_size, per_device_batch, start)
    loader = torch.utils.data.DataLoader(
        SeededItems(train_dataset, tc.seed), batch_sampler=sampler,
        num_workers=cfg.data.num_workers, pin_memory=dev.type == "cuda",
        generator=torch.Generator())  # its own generator: the global RNG (dropout) is untouched

    logger = RunLogger(out_dir, enabled=info.is_main, tensorboard=tensorboard,
                       resume_from=start if ckpt_path is not None else None)
    if info.is_main:
        (out_dir / "config.json").write_text(json.dumps(configs.to_dict(cfg), indent=2))

    def checkpoint(iteration: int, path: Path = last_path) -> Path:
        states = all_gather_object(rng_state())  # every process's RNG, for an exact resume
        if info.is_main:
            epoch, position = order.position(iteration)
            save_checkpoint({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": states, "iteration": iteration, "max_iters": max_iters,
                "epoch": epoch, "position": position, "best_miou": best_miou,
                "world_size": info.world_size, "per_device_batch": per_device_batch,
                "config": configs.to_dict(cfg),
            }, path)
        barrier()
        return path

    def run_validation(iteration: int) -> dict | None:
        nonlocal best_miou
        if not validate or val_dataset is None:
            return None
        from upernet_ref.evaluation.evaluate import evaluate
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            res = evaluate(raw_model, val_dataset, cfg, dev, progress=False)  # RNG untouched
        record = {"kind": "val", "iter": iteration, "miou": res["miou"], "macc": res.get("macc"),
                  "aacc": res.get("aacc")}
        logger.log(record)
        say(f"iter {iteration}: val mIoU {100 * res['miou']:.2f}%")
        if res["miou"] > best_miou:
            best_miou = res["miou"]
            checkpoint(iteration, best_path)
        return record

    stop = StopFlag(handle_signals)
    show = progress if progress is not None else (info.is_main and sys.stderr.isatty())
    bar = None
    if show and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=start, desc=cfg.name, unit="it", dynamic_ncols=True)

    result = TrainResult(out_dir, start, max_iters, [], last_path if ckpt_path else None,
                         per_device_batch=per_device_batch, accumulation=accum,
                         world_size=info.world_size)
    data_iter = iter(loader)
    window_start, window_iters = time.perf_counter(), 0
    window_sums = torch.zeros(3, dtype=torch.float64)  # loss, loss_out, loss_aux over the window
    it = start
    try:
        while it < end:
            forward_model.train()
            lr = optimizer.param_groups[0]["lr"]
            micro_batches = [next(data_iter) for _ in range(accum)]
            try:
                losses = train_step(forward_model, micro_batches, optimizer, scaler, cfg,
                                    distributed=info.distributed)
            except NonFiniteLossError as err:
                kept = (f"the last good checkpoint is {last_path}" if last_path.exists()
                        else "no checkpoint was written yet")
                raise NonFiniteLossError(
                    f"{err} at iteration {it + 1} of {cfg.name}; stopped before applying that "
                    f"update; {kept}. Try a lower --train.lr, --train.amp=none, or check the data "
                    f"(upernet data check)") from None
            stopping_now = all_reduce_sum(torch.tensor([float(stop.signum != 0)], device=dev))
            sums = torch.stack([losses.loss, losses.loss_out, losses.loss_aux])
            loss_value = losses.loss.item()
            scheduler.step()
            it += 1
            window_iters += 1
            window_sums += sums.double().cpu()
            result.losses.append(loss_value)
            result.iteration = it
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

            if it % tc.log_interval == 0 or it == end:
                elapsed = time.perf_counter() - window_start
                sec_per_iter = elapsed / max(window_iters, 1)
                epoch = (it * tc.batch_size) / len(train_dataset)
                means = (window_sums / max(window_iters, 1)).tolist()  # mean over the window
                record = {"kind": "train", "iter": it, "epoch": round(epoch, 4),
                          "loss": means[0], "loss_out": means[1], "loss_aux": means[2], "lr": lr,
                          "sec_per_iter": sec_per_iter,
                          "img_per_sec": tc.batch_size / max(sec_per_iter, 1e-9),
                          "eta_sec": sec_per_iter * (end - it)}
                logger.log(record)
                if bar is None:
                    stopping = f" (stop at {end})" if end < max_iters else ""
                    say(f"iter {it}/{max_iters}{stopping}  epoch {epoch:.2f}  loss {means[0]:.4f}  lr {lr:.3e}  "
                        f"{record['img_per_sec']:.1f} img/s  eta {record['eta_sec'] / 60:.1f} min")
                window_start, window_iters = time.perf_counter(), 0
                window_sums.zero_()

            if stopping_now.item() > 0:  # a signal reached some process: all stop together
                result.last_checkpoint = checkpoint(it)
                result.interrupted = signal.Signals(stop.signum).name if stop.signum else "signal"
                say(f"stopped by {result.interrupted} at iteration {it}; checkpoint "
                    f"{last_path}; continue with --resume")
                break
            # The checkpoint comes before the validation: a failure or a kill while validating
            # loses no training.
            at_end = it == end
            due_checkpoint = at_end or bool(tc.checkpoint_interval and it % tc.checkpoint_interval == 0)
            due_val = (it == max_iters) if at_end else bool(tc.val_interval and it % tc.val_interval == 0)
            if due_checkpoint:
                result.last_checkpoint = checkpoint(it)
            if due_val:
                best_before = best_miou
                rec = run_validation(it)
                if rec:
                    result.val.append(rec)
                if due_checkpoint and best_miou != best_before:
                    checkpoint(it)  # so that last.pt knows the new best mIoU
            if due_checkpoint and not at_end:
                logger.plot(cfg.name)
            if window_iters == 0:  # speed figures leave out validation and checkpoint time
                window_start = time.perf_counter()
        else:  # the loop did not run: nothing to do (a finished run resumed), or max_iters == 0
            if it == start and ckpt_path is None:
                result.last_checkpoint = checkpoint(it)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        del data_iter
        logger.plot(cfg.name)
        logger.close()
    return result


def _checkpoint_to_resume(resume: bool | str | Path, last_path: Path,
                          say: typing.Callable[[str], None]) -> Path | None:
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


def restore_training_state(path: Path, cfg: Config, info: DistInfo, max_iters: int,
                           model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: typing.Any, scaler: torch.amp.GradScaler,
                           say: typing.Callable[[str], None], trust: bool = False
                           ) -> tuple[int, float]:
    """Load a trainer checkpoint for an exact continuation; returns (iteration, best mIoU).

    Weights, momentum, schedule position, AMP scale and this process's RNG state are restored.
    A different `max_iters` continues on the new poly curve from the saved iteration; a different
    number of processes keeps the data order (it depends on the iteration only) but restarts the
    random streams.
    """
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
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.max_iters = max_iters
    # the optimizer holds the next lr of the *saved* schedule; recompute it for this one
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
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
