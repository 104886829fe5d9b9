"""A run folder's operations: its logs (one JSON object per line in `log.jsonl`, TensorBoard, a
`curves.png` plot), the lock that keeps one run per folder, and stopping on a signal.

`log.jsonl` is the record of a run: `{"kind": "train", "iter", "epoch", "loss", "loss_out",
"loss_aux", "lr", "sec_per_iter", "img_per_sec", "eta_sec"}` every `log_interval` iterations
(losses and speed averaged over those iterations, `lr` that of the last one) and
`{"kind": "val", "iter", "miou", "macc", "aacc"}` after each validation. When a run resumes, the
lines written after the checkpoint's iteration are dropped, so the file reads like one run.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import typing
from functools import partial
from pathlib import Path
from typing import Any

from upernet_ref.errors import UsageError
from upernet_ref.files import atomic_write

_log = logging.getLogger(__name__)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `log.jsonl` file ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
    return records


def plot_curves(records: list[dict[str, Any]], path: str | Path | None = None, title: str = ""):
    """Loss, learning rate and (when present) validation mIoU against iterations.

    Returns the matplotlib figure; writes it to `path` when given (and closes it).
    """
    import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    ncols = 3 if val else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.2))
    its = [r["iter"] for r in train]
    axes[0].plot(its, [r["loss"] for r in train], label="total")
    if train and "loss_aux" in train[0]:
        axes[0].plot(its, [r["loss_out"] for r in train], label="main CE", lw=0.8)
        axes[0].plot(its, [r["loss_aux"] for r in train], label="aux CE", lw=0.8)
    axes[0].set(xlabel="iteration", ylabel="loss", title="training loss")
    axes[0].legend()
    axes[1].plot(its, [r["lr"] for r in train])
    axes[1].set(xlabel="iteration", ylabel="learning rate", title="poly schedule")
    if val:
        axes[2].plot([r["iter"] for r in val], [100 * r["miou"] for r in val], marker="o")
        axes[2].set(xlabel="iteration", ylabel="mIoU (%)", title="validation mIoU")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        atomic_write(path, partial(fig.savefig, dpi=100, format="png"))
        plt.close(fig)
    return fig


class RunLogger:
    """Writes records to `out_dir/log.jsonl` and TensorBoard (rank 0 only; no-op elsewhere)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_from: int | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / "log.jsonl"
        self.records: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            # keep what happened up to the checkpoint, forget what came after it
            self.records = [r for r in read_log(self.path) if r.get("iter", 0) <= resume_from]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.out_dir / "tb"),
                                            purge_step=resume_from + 1 if resume_from else None)
            except ImportError:  # the JSON log is enough; say how to get the TensorBoard one
                _log.info("note: no TensorBoard logs (tensorboard is not installed: pip install "
                          "'upernet_ref[tb]'); log.jsonl has every record")
                self.writer = None
            except Exception:  # tensorboard broken: the JSON log is enough
                self.writer = None

    def _rewrite(self) -> None:
        with open(self.path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))  # wall clock, Unix seconds
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            kind, step = record.get("kind", "train"), record.get("iter", 0)
            for key, value in record.items():
                if key not in ("kind", "iter", "time") and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def plot(self, title: str = "") -> Path | None:
        """Write `curves.png`; None when there is nothing to plot or no matplotlib (a bare
        GPU machine: the run must not fail for want of a picture, log.jsonl has it all)."""
        if not self.enabled or not any(r.get("kind") == "train" for r in self.records):
            return None
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return None
        path = self.out_dir / "curves.png"
        plot_curves(self.records, path, title)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------------------------
# One run per output folder


@contextlib.contextmanager
def run_folder_lock(out_dir: Path, enabled: bool = True) -> typing.Iterator[None]:
    """Hold `out_dir/.lock` (an flock) for the run, so a second training started into the same
    folder stops at once (UsageError, exit 2) instead of interleaving its checkpoints and log
    lines with the first one's. The lock goes with the process, even after kill -9 (which
    leaves the file: the next run takes it over)."""
    if not enabled:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UsageError(f"{out_dir} is used by another training run ({holder}): wait for it "
                             f"to finish, or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:  # the folder is left as the run wrote it (removed while still held)
            with contextlib.suppress(OSError):
                (out_dir / ".lock").unlink()


# --------------------------------------------------------------------------------------------
# Stopping on a signal


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and stops at the iteration's end.

    A second signal stops at once (KeyboardInterrupt). Handlers are only installed from the main
    thread (Python's rule); `restore()` puts the previous ones back.
    """

    def __init__(self, install: bool):
        self.signum = 0
        self.previous: dict[int, typing.Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        _log.warning(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this "
                     f"iteration, then stopping (send it again to stop at once)")

    def reason(self) -> str | None:
        """The signal's name ("SIGTERM") once one arrived, else None (the loop's `should_stop`)."""
        return signal.Signals(self.signum).name if self.signum else None

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
