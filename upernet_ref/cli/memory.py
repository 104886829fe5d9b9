"""`upernet memory`: estimate the peak device memory of a training step without running it
(fake tensors, no GPU needed), and the largest batch that fits.

    upernet memory --config upernet_r50_os8_ade20k --memory-gb 24

The library side is `upernet_ref.perf.memory`.
"""
from __future__ import annotations
import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from upernet_ref import configs
from upernet_ref.cli.common import (OVERRIDES_HELP, check_writable_folder, command,
                                    parse_args_and_overrides, parse_pair, positive_int)
from upernet_ref.config_files import load_config
from upernet_ref.errors import before_work
from upernet_ref.files import write_text
from upernet_ref.perf.memory import (estimate_training_memory, largest_batch)

EPILOG = ("The estimate runs two of the trainer's own steps (trainer.train_step) on fake tensors "
          "while torch's memory tracker follows every tensor. Read it as a lower bound: it leaves "
          "out the CUDA context (~0.5 GB), cuDNN / cuBLAS workspaces, allocator fragmentation, "
          "DDP's gradient buckets and torch.compile's intermediates (upernet_ref/perf/memory.py "
          "says how it compares with measured peaks).")
DESCRIPTION = ("Estimate the peak device memory of a training step without running it (fake "
               "tensors, no GPU needed), and the largest batch that fits.")


@command("upernet memory")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet memory", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EPILOG + "\n\n" + OVERRIDES_HELP)
    parser.add_argument("--config", required=True,
                        help="configuration name or file, or 'all' for the 12 published ones")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="images per device (default: the published per-GPU batch, the "
                             "global batch over 8 GPUs: 2, or 1 for Cityscapes)")
    parser.add_argument("--size", type=parse_pair, help="input HxW (default: the crop size)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16", "both"), default=None,
                        help="autocast to estimate (default: both none and bf16, or the "
                             "configuration's with --train.amp=...)")
    parser.add_argument("--memory-gb", type=float, default=80.0,
                        help="also find the largest batch that fits in 85%% of this (default 80)")
    parser.add_argument("--json", help="write the estimates to this JSON file")
    args, overrides = parse_args_and_overrides(parser, argv)

    names = list(configs.PUBLISHED) if args.config == "all" else [args.config]
    amp_given = any(item.startswith("train.amp=") for item in overrides)
    amps = ((None,) if amp_given and args.amp is None else ("none", "bf16")
            if args.amp in (None, "both") else (args.amp,))
    with before_work():
        cfgs = [load_config(name, overrides) for name in names]
        if args.json:
            check_writable_folder(Path(args.json).parent, "--json")
    rows: list[dict[str, typing.Any]] = []
    print(f"{'config':32s} {'amp':5s} {'input':>11s} {'weights':>8s} {'momentum':>9s} "
          f"{'activ.':>8s} {'temp':>7s} {'total MB':>9s}   largest batch in {args.memory_gb:g} GB")
    for cfg in cfgs:
        name = cfg.name
        for amp in amps:
            batch = args.batch or max(1, cfg.train.batch_size // 8)
            est = estimate_training_memory(cfg, batch, args.size, amp)
            amp = est.amp
            fit, fit_est = largest_batch(cfg, args.memory_gb, args.size, amp)
            rows.append({**dataclasses.asdict(est), "memory_gb": args.memory_gb,
                         "largest_batch": fit, "largest_batch_total_mb": fit_est.total_mb})
            print(f"{name:32s} {amp:5s} {f'{est.batch}x{est.size[0]}x{est.size[1]}':>11s} "
                  f"{est.weights_mb:8.0f} {est.optimizer_mb:9.0f} {est.activations_mb:8.0f} "
                  f"{est.temporary_mb:7.0f} {est.total_mb:9.0f}   {fit} ({fit_est.total_mb:,.0f} MB)",
                  flush=True)
    print("estimates from fake tensors (no data): a lower bound; add ~0.5 GB of CUDA context, "
          "workspaces and fragmentation (see upernet memory --help)")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
