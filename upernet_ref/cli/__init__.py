"""The `upernet` command: one entry point, one subcommand per module.

    upernet demo                      the README's main job on the embedded demo data
    upernet configs                   the 12 published configurations, parameters and GMACs
    upernet data {prepare,check} ...  dataset preparation and checks
    upernet train --config NAME ...   training (torchrun for several GPUs)
    upernet eval  --config NAME ...   evaluation (mIoU)
    upernet predict ...               predictions as PNGs and overlays
    upernet bench --config NAME ...   speed and memory figures
    upernet memory --config NAME ...  a training step's memory, estimated without a GPU
    upernet export --config NAME ...  ONNX / torch.export / safetensors folder (+ Hub upload)

Each subcommand lives in its own module here, `upernet_ref/cli/<command>.py`, as
`main(argv) -> int`, imported only when used. The library (`upernet_ref.model`, `.data`,
`.training`, `.evaluation`, `.perf`) has no argparse: every command line is in this folder.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("upernet_ref.cli.demo", "run the main job on the embedded demo data"),
    "configs": ("upernet_ref.cli.configs", "list the configurations with parameters and GMACs"),
    "data": ("upernet_ref.cli.data", "prepare and check datasets"),
    "train": ("upernet_ref.cli.train", "train a configuration"),
    "eval": ("upernet_ref.cli.eval", "evaluate a checkpoint (mIoU)"),
    "predict": ("upernet_ref.cli.predict", "predict segmentation maps for images"),
    "bench": ("upernet_ref.cli.bench", "benchmark speed and memory"),
    "memory": ("upernet_ref.cli.memory", "estimate a training step's device memory (no GPU needed)"),
    "export": ("upernet_ref.cli.export", "export to ONNX, torch.export or a safetensors model "
                                         "folder (Hugging Face layout, --push-to-hub)"),
}



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
