"""What the commands share: argparse types, the configuration overrides
(`parse_args_and_overrides`) and the one error handler (`command`)."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import signal
import sys
import tempfile
import typing
from pathlib import Path

import torch

from upernet_ref.launch import launch_rank_and_world
from upernet_ref.errors import UperNetError, UsageError, before_work, found_before_work

if typing.TYPE_CHECKING:
    from upernet_ref.configs import Config


OVERRIDES_HELP = ("Any --section.field=value (e.g. --train.lr=0.02, --test.stride=256x256, "
                  "--data.num_workers=8) overrides the configuration, type-checked (the fields "
                  "are those of the dataclasses in upernet_ref/configs.py).")


def parse_args_and_overrides(parser: argparse.ArgumentParser,
                             argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parser's own options, and the `--section.field=value` configuration overrides.

    This is the one override syntax of every command that takes a configuration (train, eval,
    predict, bench, memory, export); the items come back as "section.field=value" strings for
    `configs.override`, which type-checks them. Anything else unknown is an argparse error.
    """
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        key = item[2:] if item.startswith("--") else ""
        name = key.split("=", 1)[0]
        if "." not in name:
            parser.error(f"unrecognized argument {item!r} (configuration overrides look like "
                         f"--train.lr=0.02)")
        if "=" not in key:
            parser.error(f"{item}: give the value after '=' ({item}=VALUE)")
        overrides.append(key)
    return args, overrides


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


# --------------------------------------------------------------------------------------------
# The one error handler: an expected error -> `upernet CMD: error: ...` and the exit code

_OS_PROBLEMS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory",
                errno.ENOTDIR: "not a folder", errno.EISDIR: "is a folder, not a file"}
_EXPECTED = (UperNetError, OSError, ValueError, KeyError, TypeError, RuntimeError, MemoryError)
# what a collective reports when another process of the group died (gloo, NCCL)
_LOST_PEER = re.compile(r"Connection closed by peer|Connection reset by peer|remote process exited"
                        r"|NCCL communicator was aborted", re.IGNORECASE)


def unwrap_worker_message(text: str) -> str:
    """The original message of an error raised in a DataLoader worker.

    torch re-raises a worker's exception in the main process with the same type but with the
    worker's whole traceback as message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ... upernet_ref.data.datasets.DataError: <message>"); the user wants the
    last part only, as they get it without workers.
    """
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, 0, -1):
        match = re.match(r"([A-Za-z_][\w.]*): (.*)", lines[i])
        if match and not lines[i].startswith(" "):
            return "\n".join([match.group(2)] + lines[i + 1:])
    return lines[-1]


def _os_error_message(err: OSError) -> str:
    text = unwrap_worker_message(str(err))
    if err.errno is None:  # an OSError re-raised from a worker: "[Errno 28] No space ...: 'x'"
        match = re.match(r"\[Errno (\d+)\] ([^:]*)(?:: '(.*)')?$", text)
        if not match:
            return text
        err = OSError(int(match.group(1)), match.group(2), match.group(3))
    problem = _OS_PROBLEMS.get(err.errno, err.strerror or text)
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return f"{' -> '.join(names)}: {problem}" if names else problem


def error_message(err: BaseException) -> str:
    """The text after `upernet CMD: error: ` for an exception (no traceback, no type names for
    the project's expected errors)."""
    if isinstance(err, OSError) and not isinstance(err, UperNetError):
        return _os_error_message(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or isinstance(err, MemoryError):
        first = (unwrap_worker_message(str(err)).strip().splitlines() or [""])[0]
        return (f"out of memory ({first[:200]}); try a smaller --per-device-batch, "
                f"--train.amp=bf16, a smaller image or crop") if first else "out of memory"
    text = unwrap_worker_message(str(err)).strip()
    if isinstance(err, KeyError) and not isinstance(err, UperNetError) and len(err.args) == 1:
        text = str(err.args[0])  # KeyError's str() is the repr of its key
    if isinstance(err, UperNetError):
        return text or type(err).__name__
    lines = text.splitlines() or [type(err).__name__]
    first = lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."
    return first + (" (...)" if len(lines) > 1 else "")


def exit_code(err: BaseException) -> int:
    """2 before any work, 3 for a non-finite loss, 1 for other failures during the work."""
    code = getattr(err, "exit_code", 1)
    if code == 1 and found_before_work(err):
        return 2
    return int(code)


def report_error(prog: str, err: BaseException) -> int:
    """Print `prog: error: ...` for `err` on stderr (once per run: rank 0, or the rank that hit
    a problem during the work) and return the exit code."""
    code = exit_code(err)
    if isinstance(err, _EXPECTED):
        message = error_message(err)
    else:  # not one of the errors the project expects: a bug, said so, still on one line
        message = (f"internal error, please report it: {type(err).__name__}: "
                   f"{error_message(err)} (UPERNET_TRACEBACK=1 shows the traceback)")
    try:
        rank, world = launch_rank_and_world()
    except ValueError:  # a malformed RANK / WORLD_SIZE: the error being reported, likely
        rank, world = 0, 1
    if world > 1:
        if code == 2 and rank > 0:  # every process sets up the same way: rank 0 reports it
            return code
        lost_peer = bool(_LOST_PEER.search(message))
        if lost_peer:  # a consequence, not the cause: the process that failed says why
            message = "stopped because another process failed (its error is above)"
        if rank > 0 or lost_peer:
            message = f"rank {rank} of {world}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def command(prog: str) -> typing.Callable[[typing.Callable[..., int]], typing.Callable[..., int]]:
    """Decorate a command's `main(argv) -> int`: the project's expected errors, and errors from
    DataLoader workers, become one line `prog: error: ...` and the documented exit code.

    argparse's own errors (exit 2, with the usage line) pass through. Ctrl-C outside training's
    own handler exits 130. `UPERNET_TRACEBACK=1` re-raises instead, for debugging.
    """
    def decorate(main: typing.Callable[..., int]) -> typing.Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return int(main(argv) or 0)
            except SystemExit:
                raise
            except KeyboardInterrupt:
                print(f"\n{prog}: error: interrupted", file=sys.stderr)
                return 128 + signal.SIGINT
            except Exception as err:
                if os.environ.get("UPERNET_TRACEBACK"):
                    raise
                return report_error(prog, err)
        return run
    return decorate


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """`folder` exists (created if needed) and a file can be written in it; else an OSError
    naming it (raised before any work, so the command exits 2 and nothing is computed)."""
    folder = Path(folder)
    with before_work():
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{what} {folder}: exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".upernet_write_test_")
            probe.close()
        except OSError as err:
            raise UsageError(f"{what} {folder}: cannot write there "
                             f"({_OS_PROBLEMS.get(err.errno, err.strerror)})") from None
    return folder


def show_progress(disabled: bool = False) -> bool:
    """Whether to draw a progress bar: not `--no-progress`, stderr a terminal, and one with a
    width. A terminal of width 0 (a 0x0 pty: some CI runners, `script`, detached sessions) gets
    no bar, since tqdm would draw nothing there; the commands print plain log lines instead."""
    if disabled or not sys.stderr.isatty():
        return False
    try:
        columns = int(os.environ.get("COLUMNS") or os.get_terminal_size(sys.stderr.fileno()).columns)
    except (OSError, ValueError):
        columns = 0
    return columns >= 20


def add_trust_checkpoint(parser: argparse.ArgumentParser) -> None:
    """`--trust-checkpoint`, for every command that opens a checkpoint (see `checkpoints`)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="open a checkpoint that needs more than tensors and plain data with "
                             "the full unpickler: this runs any code the file contains, so only "
                             "for files whose source you trust (README, 'Checkpoints')")


def checkpoint_config(name: str | None, state: typing.Any, where: str | None) -> Config:
    """The configuration `--config NAME` names, else the one a checkpoint stores (ours and the
    Hugging Face folders do; `checkpoints.stored_config`, checked); refused in one line naming
    both ways out (exit 2)."""
    from upernet_ref import configs
    from upernet_ref.config_files import load_config
    from upernet_ref.checkpoints import stored_config
    if name:
        return load_config(name)
    cfg = stored_config(state, where) if state is not None and where is not None else None
    if cfg is None:
        raise UsageError((f"checkpoint {where} stores no configuration: pass" if where
                          else "pass a checkpoint or")
                         + f" --config NAME (one of {', '.join(configs.list_configs())})")
    return cfg
