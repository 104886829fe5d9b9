"""`upernet train`: train a configuration with the published recipe (SGD, poly schedule, the
configuration's loss) on a CPU, one GPU or many (start it with torchrun).

    upernet train --config upernet_small_demo
    upernet train --config upernet_r50_os8_ade20k --data-root data/ade --train.lr=0.02
    torchrun --nproc_per_node=8 -m upernet_ref.cli train --config upernet_r50_os8_ade20k ...
    upernet train --config ... --out runs/x --resume              # continue from runs/x/last.pt

The loop is `upernet_ref.training.trainer.train`; this command is what surrounds it: the
process group, the run folder (its lock, `config.json`, `log.jsonl`, TensorBoard, `curves.png`,
atomic checkpoints), the model with its initial weights, the datasets, the checkpoint to resume
from, the SIGTERM / SIGINT flag (a checkpoint is saved, then the run stops) and the progress bar.
`run_training(cfg, ...)` does the same from Python (tests, notebooks, `upernet demo`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import typing
from pathlib import Path

import torch

from upernet_ref import configs
from upernet_ref.checkpoints import (is_hub_id, load_backbone_weights, load_weights,
                                     read_checkpoint_file, remove_stale_temporary_files,
                                     save_checkpoint)
from upernet_ref.cli.common import (OVERRIDES_HELP, add_trust_checkpoint, check_writable_folder,
                                    command, parse_args_and_overrides, positive_int,
                                    show_progress)
from upernet_ref.launch import DistInfo, cleanup, init_distributed, launch_rank_and_world
from upernet_ref.config_files import load_config
from upernet_ref.configs import Config
from upernet_ref.data.transforms import test_transform, train_transform
from upernet_ref.sources import dataset_for, with_class_names
from upernet_ref.errors import before_work
from upernet_ref.evaluation.evaluate import check_test_form
from upernet_ref.files import write_text
from upernet_ref.model.upernet import build_model
from upernet_ref.perf.batch_probe import probe_per_device_batch
from upernet_ref.runs import (RunLogger, StopFlag, check_run_folder, resume_changes,
                              run_folder_lock)
from upernet_ref.training.runtime import seed_everything
from upernet_ref.training.trainer import TrainResult, train

Say = typing.Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="upernet train", description=__doc__.split("\n\n")[0],
        epilog=OVERRIDES_HELP + " Several GPUs or machines: start this command with torchrun "
               "(see README).")
    parser.add_argument("--config", required=True,
                        help="configuration name (upernet configs) or file (.json, .yaml: "
                             "upernet configs --dump, a run folder's config.json)")
    parser.add_argument("--data-root", default=None, help="dataset folder (not for the demo data)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue from OUT/last.pt (or the given checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train afresh into an --out that holds a run: its files move to "
                             "OUT/replaced-DATE-TIME/ first (nothing is deleted)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--per-device-batch", type=positive_int, default=None,
                        help="images per process per step (default: the largest that fits)")
    parser.add_argument("--max-iters", type=positive_int, default=None,
                        help="schedule length (default epochs x iterations per epoch)")
    parser.add_argument("--stop-at", type=positive_int, default=None,
                        help="stop with a checkpoint after this iteration (schedule unchanged)")
    parser.add_argument("--weights", default=None,
                        help="initialise the whole model (fine-tune): our checkpoint, a published "
                             "sssegmentation / mmsegmentation file, a Hugging Face folder "
                             "(upernet export --format safetensors) or a .safetensors file")
    parser.add_argument("--reinit-classifier", action="store_true",
                        help="with --weights: load all but the two classifiers and re-initialise "
                             "those for the configuration's classes (fine-tune into another "
                             "class count, e.g. --data.num_classes=5)")
    add_trust_checkpoint(parser)
    parser.add_argument("--backbone-weights", default=None,
                        help="ImageNet backbone weights (torchvision or open-mmlab resnet*_v1c)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-val", action="store_true", help="skip periodic validation")
    parser.add_argument("--fast", action="store_true",
                        help="the fast training settings for the device (fast_train_overrides: "
                             "bf16/fp16 autocast where the device is fast at it, channels_last, "
                             "torch.compile on CUDA; not on the CPU, where the compiled step "
                             "was slower, docs/benchmarks.md; on the CPU the head's fusion "
                             "convs use late upsampling, the logits are upsampled in float32 "
                             "and every conv gets a channels_last input, "
                             "fast.fast_training_model); explicit --train.* overrides still win")
    args, overrides = parse_args_and_overrides(parser, argv)
    if args.reinit_classifier and not args.weights:
        parser.error("--reinit-classifier re-initialises the classifiers of --weights FILE: "
                     "give --weights")
    return args, overrides


def fast_train_overrides(device: str | None) -> list[str]:
    """`--fast` for training: the device's `fast.default_fast_settings` (the rules of the fast
    inference path, measured in docs/benchmarks.md) as configuration overrides."""
    from upernet_ref.launch import resolve_device
    from upernet_ref.perf.fast import default_fast_settings
    overrides = default_fast_settings(resolve_device(device)).train_overrides()
    return [f"{key}={value}" for key, value in overrides.items()]


def fast_train_model(model: torch.nn.Module, device: str | None) -> torch.nn.Module:
    """`--fast` for training, the part that is not a configuration value
    (`fast.fast_training_model`: on the CPU late upsampling for the head's fusion convs, under
    autocast the heads' logits upsampled in float32, with channels_last every conv given a
    channels_last input; a class change and forward hooks, so the state dict and the
    checkpoints are unchanged)."""
    from upernet_ref.launch import resolve_device
    from upernet_ref.perf.fast import default_fast_settings, fast_training_model
    train_cfg = model.config.train
    return fast_training_model(model, default_fast_settings(resolve_device(device)),
                               train_cfg.amp, train_cfg.channels_last)[0]


@command("upernet train")
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    with before_work():
        if args.fast:  # the explicit overrides come after, so they win
            overrides = fast_train_overrides(args.device) + overrides
        cfg = load_config(args.config, overrides)
        out_dir = check_writable_folder(args.out or Path("runs") / cfg.name, "--out")
        main_rank = launch_rank_and_world()[0] == 0  # a used folder: refused, or moved aside
        check_run_folder(out_dir, resume=args.resume, overwrite=args.overwrite,
                         say=print if main_rank else _quiet, move=main_rank)
    with prepared_run(cfg, data_root=args.data_root, out_dir=out_dir, resume=args.resume,
                      device=args.device, per_device_batch=args.per_device_batch,
                      max_iters=args.max_iters, stop_at=args.stop_at, weights=args.weights,
                      backbone_weights=args.backbone_weights, validate=not args.no_val,
                      reinit_classifier=args.reinit_classifier,
                      trust_checkpoint=args.trust_checkpoint,
                      progress=show_progress(args.no_progress)) as run:
        if args.fast:
            fast_train_model(run.model, args.device)
        result = train(run.model.config, run.model, run.train_set, run.val_set, run.out_dir,
                       **run.options)  # the config with the dataset's class names
    if result.interrupted:  # "SIGTERM", "SIGINT", or "signal" when another rank got it
        return 128 + int(signal.Signals.__members__.get(result.interrupted, signal.SIGTERM))
    if launch_rank_and_world()[0] == 0:
        print(f"done: {result.iteration} iterations; checkpoint {result.last_checkpoint}; "
              f"log {result.out_dir / 'log.jsonl'}; curves {result.out_dir / 'curves.png'}")
    return 0


def run_training(cfg: Config | str, data_root: str | None = None,
                 out_dir: str | Path | None = None, **options: typing.Any) -> TrainResult:
    """`upernet train` from Python: `prepared_run(cfg, ...)` (same options), then the loop.

    E.g. `run_training("upernet_small_demo", out_dir="runs/demo", max_iters=40)`; pass
    `train_dataset=` / `val_dataset=` to train on your own datasets (tests, notebooks).
    """
    cfg = load_config(cfg)
    with prepared_run(cfg, data_root=data_root, out_dir=out_dir, **options) as run:
        return train(run.model.config, run.model, run.train_set, run.val_set, run.out_dir,
                     **run.options)


# --------------------------------------------------------------------------------------------
# What the loop is given


@dataclasses.dataclass
class PreparedRun:
    """The loop's arguments: `train(cfg, model, train_set, val_set, out_dir, **options)`."""
    model: torch.nn.Module
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset | None
    out_dir: Path
    options: dict[str, typing.Any]


@contextlib.contextmanager
def prepared_run(cfg: Config, *, data_root: str | None = None, out_dir: str | Path | None = None,
                 resume: bool | str | Path = False, device: str | None = None,
                 per_device_batch: int | None = None, max_iters: int | None = None,
                 stop_at: int | None = None, weights: str | None = None,
                 backbone_weights: str | None = None, reinit_classifier: bool = False,
                 trust_checkpoint: bool = False,
                 train_dataset: torch.utils.data.Dataset | None = None,
                 val_dataset: torch.utils.data.Dataset | None = None, validate: bool = True,
                 progress: bool | None = None, tensorboard: bool = True,
                 handle_signals: bool = True, log: Say | None = None
                 ) -> typing.Iterator[PreparedRun]:
    """Everything around the loop, held for the length of a `with` block.

    Args:
        out_dir: the run folder (default `runs/<config name>`), locked for one run at a time.
        resume: True: continue from `out_dir/last.pt` if it exists; a path: from that file.
        device: "auto" (default), "cpu", "cuda", "cuda:1", ... (under torchrun, the local GPU).
        per_device_batch: images per process per micro-step (default: the largest that fits).
        weights: initialise the whole model (fine-tuning; `checkpoints.load_weights`, with
            `reinit_classifier`); `backbone_weights`: the ImageNet backbone, as published.
        trust_checkpoint: open checkpoints that `torch.load(weights_only=True)` refuses with the
            full unpickler (runs code from the file; `checkpoints.read_checkpoint_file`).
        train_dataset / val_dataset: use these instead of `cfg.data`'s; the train set returns
            transformed fixed-size items, the val set items as `test_transform(cfg.data)` does.
        progress: a tqdm bar (default: on rank 0 when stderr is a terminal).
        log: where the run's messages go (default print; nothing on ranks other than 0).
    """
    out_dir = Path(out_dir or Path("runs") / cfg.name)
    max_iters = int(max_iters or cfg.train.max_iters)
    end = min(max_iters, stop_at) if stop_at else max_iters
    with before_work():  # a bad --device or torchrun environment
        info = init_distributed(device)
    say = (log or _print) if info.is_main else _quiet
    try:
        with run_folder_lock(out_dir, info.is_main):  # one run per folder
            seed_everything(cfg.train.seed)  # the same initial weights on every process
            # Up to the first step, a problem is the user's input: `upernet train` exits 2.
            with before_work():
                train_set, val_set = _datasets(cfg, data_root, train_dataset,
                                               val_dataset if validate else None, validate, say)
                cfg = with_class_names(cfg, train_set)  # classes.txt / ClassLabel names kept
                for stale in remove_stale_temporary_files(out_dir) if info.is_main else []:
                    say(f"removed {stale}, the temporary file of a checkpoint save that was "
                        f"interrupted")
                model = build_model(cfg)
                if backbone_weights:
                    load_backbone_weights(model, backbone_weights, trust=trust_checkpoint)
                if weights:
                    load_weights(model, weights, reinit_classifier=reinit_classifier,
                                 trust=trust_checkpoint, log=say)
                if per_device_batch is None:
                    per_device_batch = probe_per_device_batch(model, cfg, info)
                checkpoint = _checkpoint_to_resume(resume, out_dir, cfg, max_iters,
                                                   trust_checkpoint, say)
            logger = RunLogger(out_dir, enabled=info.is_main, tensorboard=tensorboard,
                               resume_from=checkpoint["iteration"] if checkpoint else None)
            if checkpoint and checkpoint["changes"]:  # the run's record says what changed
                logger.log({"kind": "resume", "iter": checkpoint["iteration"],
                            "changes": checkpoint["changes"]})
            if info.is_main:
                write_text(out_dir / "config.json", json.dumps(configs.to_dict(cfg), indent=2))
            stop = StopFlag(handle_signals)
            bar = _progress_bar(cfg, info, end, checkpoint["iteration"] if checkpoint else 0,
                                show=progress)

            def log_record(record: dict) -> None:
                logger.log(record)
                if record["kind"] == "train" and bar is None:
                    say(_train_line(record, max_iters, end))
                elif record["kind"] == "val":
                    say(f"iter {record['iter']}: val mIoU {100 * record['miou']:.2f}%")

            def save_and_plot(obj: dict, path: Path) -> None:
                if weights and is_hub_id(str(weights)):  # fine-tuned from: the card's base_model
                    obj = {**obj, "base_model": str(weights)}
                save_checkpoint(obj, path)
                logger.plot(cfg.name)

            try:
                yield PreparedRun(model, train_set, val_set, out_dir, dict(
                    save=save_and_plot, device=info.device, max_iters=max_iters,
                    stop_at=stop_at, per_device_batch=per_device_batch, resume=checkpoint,
                    log=log_record, say=say, should_stop=stop.reason,
                    **({} if bar is None else {"progress": bar.step})))
            finally:
                if bar is not None:
                    bar.close()
                stop.restore()
                logger.close()
                logger.plot(cfg.name)
    finally:
        cleanup(info)


def _print(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    pass


def _datasets(cfg: Config, data_root: str | None, train_dataset, val_dataset, validate: bool,
              say: Say):
    """The given (train, val) sets, or those of `cfg.data` (the val set None without one)."""
    if val_dataset is not None and len(val_dataset) > 0:  # a raw one is refused now, not at
        check_test_form(val_dataset[0][0])                # the first validation
    if train_dataset is None:
        if data_root and cfg.data.dataset == "demo":
            say(f"note: --data-root {data_root} is not used: {cfg.name} trains on the embedded "
                f"demo scenes")
        train_dataset = dataset_for(cfg, cfg.data.train_split, data_root,
                                    train_transform(cfg.data), on_bad=cfg.data.on_bad)
        if validate and val_dataset is None:
            try:
                val_dataset = dataset_for(cfg, cfg.data.val_split, data_root,
                                          test_transform(cfg.data))
            except (FileNotFoundError, ValueError) as err:
                print(f"note: no validation set ({err}); training without validation",
                      file=sys.stderr)
    if len(train_dataset) == 0:
        raise ValueError(f"the training set of {cfg.name} is empty")
    return train_dataset, val_dataset


def _checkpoint_to_resume(resume: bool | str | Path, out_dir: Path, cfg: Config, max_iters: int,
                          trust: bool, say: Say) -> dict | None:
    """The training checkpoint `--resume` means (`out_dir/last.pt` if it exists yet, or the
    given file), read and checked against `cfg` and the schedule; None to start afresh."""
    if not resume:
        return None
    path = Path(resume) if isinstance(resume, (str, Path)) else out_dir / "last.pt"
    if not path.exists():
        if isinstance(resume, (str, Path)):
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        say(f"--resume: no checkpoint at {path} yet, starting from scratch")
        return None
    ckpt = read_checkpoint_file(path, trust)
    if not all(key in ckpt for key in ("model", "optimizer", "scheduler", "iteration")):
        raise ValueError(f"{path}: not a training checkpoint (no optimizer and schedule state "
                         f"to continue from); to start from its weights use --weights {path}")
    ckpt["changes"] = resume_changes(ckpt, cfg, max_iters, path)  # or refused
    for change in ckpt["changes"]:
        say(f"--resume: {change}, applied from iteration {ckpt['iteration']} on")
    if int(ckpt["iteration"]) > max_iters:
        raise ValueError(f"{path} is at iteration {ckpt['iteration']}, beyond a schedule of "
                         f"{max_iters} iterations: resume with --max-iters {ckpt['iteration']} "
                         f"or more")
    say(f"resuming from {path} at iteration {ckpt['iteration']}")
    return ckpt


def _train_line(record: dict, max_iters: int, end: int) -> str:
    """A train record of `log.jsonl` as the line printed when there is no progress bar."""
    stopping = f" (stop at {end})" if end < max_iters else ""
    return (f"iter {record['iter']}/{max_iters}{stopping}  epoch {record['epoch']:.2f}  "
            f"loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
            f"{record['img_per_sec']:.1f} img/s  eta {record['eta_sec'] / 60:.1f} min")


class _Bar:
    """A tqdm bar that the loop's `progress(iteration, loss, lr)` advances."""

    def __init__(self, total: int, initial: int, name: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="it", dynamic_ncols=True)

    def step(self, iteration: int, loss: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        self.bar.close()


def _progress_bar(cfg: Config, info: DistInfo, end: int, start: int,
                  show: bool | None) -> _Bar | None:
    """A progress bar on rank 0 (default: when stderr is a terminal); without it, log lines."""
    if not info.is_main or not (show if show is not None else sys.stderr.isatty()):
        return None
    return _Bar(end, start, cfg.name)


if __name__ == "__main__":
    sys.exit(main())
