"""`upernet train`: train a configuration with the published recipe (SGD, poly schedule, the
configuration's loss) on a CPU, one GPU or many (start it with torchrun).

    upernet train --config upernet_small_demo
    upernet train --config upernet_r50_os8_ade20k --data-root data/ade --train.lr=0.02
    torchrun --nproc_per_node=8 -m upernet_ref.cli train --config upernet_r50_os8_ade20k ...

The library side is `upernet_ref.training.trainer`.
"""
from __future__ import annotations
import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from upernet_ref import configs
from upernet_ref.cli.common import (OVERRIDES_HELP, add_trust_checkpoint, check_writable_folder,
                                    command, parse_args_and_overrides, positive_int)
from upernet_ref.errors import before_work
from upernet_ref.training.trainer import train


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="upernet train", description=__doc__.split("\n\n")[0],
        epilog=OVERRIDES_HELP + " Several GPUs or machines: start this command with torchrun "
               "(see README).")
    parser.add_argument("--config", required=True, help="configuration name (upernet configs)")
    parser.add_argument("--data-root", default=None, help="dataset folder (not for the demo data)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue from OUT/last.pt (or the given checkpoint)")
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
                             "torch.compile on CUDA); explicit --train.* overrides still win")
    args, overrides = parse_args_and_overrides(parser, argv)
    if args.reinit_classifier and not args.weights:
        parser.error("--reinit-classifier re-initialises the classifiers of --weights FILE: "
                     "give --weights")
    return args, overrides


def fast_train_overrides(device: str | None) -> list[str]:
    """`--fast` for training: the device's `fast.default_fast_settings` (the rules of the fast
    inference path, measured in docs/benchmarks.md) as configuration overrides."""
    from upernet_ref.perf.fast import default_fast_settings
    name = device if device not in (None, "", "auto") else (
        "cuda" if torch.cuda.is_available() else "cpu")
    overrides = default_fast_settings(torch.device(name)).train_overrides()
    return [f"{key}={value}" for key, value in overrides.items()]


@command("upernet train")
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    with before_work():
        if args.fast:  # the explicit overrides come after, so they win
            overrides = fast_train_overrides(args.device) + overrides
        cfg = configs.get_config(args.config, overrides)
        check_writable_folder(args.out or Path("runs") / cfg.name, "--out")
    result = train(cfg, args.data_root, args.out, args.resume, args.device,
                   args.per_device_batch, args.max_iters, args.stop_at, args.weights,
                   args.backbone_weights, progress=False if args.no_progress else None,
                   validate=not args.no_val, reinit_classifier=args.reinit_classifier,
                   trust_checkpoint=args.trust_checkpoint)
    if result.interrupted:
        return 128 + int(getattr(signal, result.interrupted, signal.SIGTERM))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.iteration} iterations; checkpoint {result.last_checkpoint}; "
              f"log {result.out_dir / 'log.jsonl'}; curves {result.out_dir / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
