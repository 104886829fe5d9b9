"""`upernet bench`: measure the speed and memory of inference and of the training step; with
--fast, eager and the fast path timed in turn and their speed-up.

    upernet bench --config upernet_r50_os8_ade20k --mode both --fast --repeats 5
    upernet bench --config upernet_r50_os8_ade20k --mode train --train.amp=bf16
    upernet bench --config upernet_r50_os8_ade20k --fast --int8 --repeats 3

The library side is `upernet_ref.perf.bench`.
"""
from __future__ import annotations
import argparse
import json
import sys
from pathlib import Path
import torch
from upernet_ref.cli.common import (OVERRIDES_HELP, check_writable_folder, command,
                                    parse_args_and_overrides, parse_pair, positive_int)
from upernet_ref.errors import UsageError, before_work
from upernet_ref.files import write_text
from upernet_ref.config_files import load_config
from upernet_ref.perf.bench import (format_table, run_bench)


@command("upernet bench")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet bench", description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", required=True, help="configuration name or file (.json, .yaml)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="images per batch (default: 1; a training step uses at least 2)")
    parser.add_argument("--size", type=parse_pair, default=None,
                        help="input HxW (default: the config's crop size)")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="infer",
                        help="time inference, a training step, or both (default: infer)")
    parser.add_argument("--fast", action="store_true", help="also measure the fast path")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        default="auto", help="fast path autocast dtype (auto: per device)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="fast path torch.compile (auto: per device)")
    parser.add_argument("--int8", action="store_true",
                        help="also time the int8 path (CPU: PT2E quantization, inductor x86 "
                             "kernels; needs torchao) and measure the fp32 / fast / int8 "
                             "argmax agreement and mIoU on the demo checkpoint")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs before timing (default: 1)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed runs; the median is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16/fp16 peak for MFU (default: hardware.PEAK_TFLOPS "
                             "by device name)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args, overrides = parse_args_and_overrides(parser, argv)

    with before_work():
        if args.int8 and not args.device.startswith("cpu"):
            raise UsageError(f"--int8 runs on the CPU only (inductor's x86 int8 kernels), not "
                             f"--device {args.device}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
        if args.int8:
            from upernet_ref.perf.int8 import pt2e_tools
            try:
                pt2e_tools()
            except ImportError as err:
                raise UsageError(f"--int8: {err}") from None
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = load_config(args.config, overrides)
        if args.json:
            check_writable_folder(Path(args.json).parent, "--json")
    result = run_bench(cfg, args.device, args.batch, args.size, args.mode, args.fast,
                       args.warmup, args.repeats, args.dtype, args.compile,
                       peak_tflops=args.peak_tflops, int8=args.int8)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        write_text(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
