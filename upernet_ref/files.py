"""Writing files so that a crash, a kill or a full disk never leaves a broken one.

Every file a command writes (checkpoints, predictions, results JSON, configuration, curves,
prepared labels) goes through `atomic_write`: the content is written to a temporary file next
to the target, flushed to the disk, and renamed over it, so the target is always either the old
complete file or the new complete one. (`checkpoints.save_checkpoint` adds the message with the
size needed when the disk is full; `checkpoints.remove_stale_temporary_files` removes the
temporary file of a write that was killed, named `.NAME.PID.XXXXXXXX.tmp`.)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from collections.abc import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to `.NAME.PID.XXXXXXXX.tmp` next to `path`, fsync, then rename it to `path`.

    The temporary file is removed if `write` fails (or the process is interrupted); the error
    is re-raised unchanged. `write` gets the temporary path, so formats must be given
    explicitly (`partial(image.save, format="PNG")`), not guessed from the suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:  # the content on the disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`Path(path).write_text(text)`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
