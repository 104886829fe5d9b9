"""Writing result files so that a crash, a kill or a full disk never leaves a broken one.

Every file a command writes (predictions, results JSON, configuration, curves, prepared labels)
goes through `atomic_write`: the content is written to a temporary file next to the target and
renamed over it, so the target is always either the old complete file or the new complete one.
Checkpoints have their own, `checkpoints.save_checkpoint` (same idea, plus fsync and a message
with the size needed when the disk is full).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to `.NAME.PID.part` next to `path`, then rename it to `path`.

    The temporary file is removed if `write` fails (or the process is interrupted); the error
    is re-raised unchanged. `write` gets the temporary path, so formats must be given
    explicitly (`partial(image.save, format="PNG")`), not guessed from the suffix.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`Path(path).write_text(text)`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
