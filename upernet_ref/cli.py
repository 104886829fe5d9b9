"""The `upernet` command: one entry point, one subcommand per module.

    upernet demo                      the README's main job on the embedded demo data
    upernet configs                   the 12 published configurations, parameters and GMACs
    upernet data {prepare,check} ...  dataset preparation and checks
    upernet train --config NAME ...   training (torchrun for several GPUs)
    upernet eval  --config NAME ...   evaluation (mIoU)
    upernet predict ...               predictions as PNGs and overlays
    upernet bench --config NAME ...   speed and memory figures
    upernet memory --config NAME ...  a training step's memory, estimated without a GPU
    upernet export --config NAME ...  ONNX / torch.export

Each subcommand lives in its own module as `main(argv) -> int`, imported only when used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("upernet_ref.demo", "run the main job on the embedded demo data"),
    "configs": ("upernet_ref.summary", "list the configurations with parameters and GMACs"),
    "data": ("upernet_ref.data_cli", "prepare and check datasets"),
    "train": ("upernet_ref.train", "train a configuration"),
    "eval": ("upernet_ref.evaluate", "evaluate a checkpoint (mIoU)"),
    "predict": ("upernet_ref.predict", "predict segmentation maps for images"),
    "bench": ("upernet_ref.bench", "benchmark speed and memory"),
    "memory": ("upernet_ref.memory", "estimate a training step's device memory (no GPU needed)"),
    "export": ("upernet_ref.export", "export to ONNX or torch.export"),
}


# argparse types shared by the subcommands

def parse_pair(text: str) -> tuple[int, int]:
    """'512x1024' or '512,1024' -> (512, 1024); '512' -> (512, 512)."""
    parts = [p.strip() for p in text.lower().replace("x", ",").split(",")]
    if "" in parts:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x1024) or one size, got {text!r}")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW with positive sizes, got {text!r}")
    return values  # type: ignore[return-value]


def positive_int(text: str) -> int:
    """'4' -> 4; zero, negative or non-integer values are refused with a message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive scales, got {text!r}")
    return values


def usage() -> str:
    lines = ["usage: upernet COMMAND [options]   (upernet COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"upernet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
