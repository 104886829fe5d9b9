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
The library logs through `logging` (logger "upernet_ref"); the command decides what is shown:
INFO and above, as plain lines on stderr (`setup_logging`).
"""
from __future__ import annotations

import importlib
import logging
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
    lines = ["usage: upernet [--version] COMMAND [options]   (upernet COMMAND --help for details)",
             "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


class _StderrLines(logging.Handler):
    """Each record as one plain line on the *current* sys.stderr (no colours, no widths)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def setup_logging() -> None:
    """Show the library's log records (INFO and up) as plain lines on stderr, once."""
    logger = logging.getLogger("upernet_ref")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if argv[:1] == ["--version"]:
        from upernet_ref import __version__
        print(f"upernet (upernet_ref) {__version__}")
        return 0
    if not argv:  # a command is required: usage on stderr, exit 2 (argparse's convention)
        print(f"upernet: error: give a command\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"upernet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
