"""A run folder's operations: its logs (one JSON object per line in `log.jsonl`, TensorBoard, a
`curves.png` plot), the lock that keeps one run per folder, the rules that keep an earlier run
from being overwritten or resumed with another recipe, and stopping on a signal.

`log.jsonl` is the record of a run: `{"kind": "train", "iter", "epoch", "loss", "loss_out",
"loss_aux", "lr", "sec_per_iter", "img_per_sec", "eta_sec"}` every `log_interval` iterations
(losses and speed averaged over those iterations, `lr` that of the last one) and
`{"kind": "val", "iter", "miou", "macc", "aacc"}` after each validation, and
`{"kind": "resume", "iter", "changes"}` when a resume changes the configuration
(`resume_changes`). When a run resumes, the lines written after the checkpoint's iteration are
dropped, so the file reads like one run.
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

from upernet_ref import configs
from upernet_ref.config_files import from_dict
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
# A used run folder is never overwritten by accident; a resumed run keeps its recipe

RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "config.json", "curves.png", "tb")


def held_run(out_dir: Path) -> str | None:
    """The earlier run `out_dir` holds, said in words ("iteration 11: last.pt, log.jsonl"), or
    None when it holds no checkpoint and no log line."""
    log = out_dir / "log.jsonl"
    held = [n for n in ("last.pt", "best.pt") if (out_dir / n).is_file()]
    held += ["log.jsonl"] if log.is_file() and log.stat().st_size else []
    if not held:
        return None
    try:
        iters = [r.get("iter", 0) for r in read_log(log)]
    except (ValueError, OSError):
        iters = []
    if not iters and "last.pt" in held:
        from upernet_ref.checkpoints import peek_checkpoint
        iters = [peek_checkpoint(out_dir / "last.pt").get("iteration", "?")]
    last = max((i for i in iters if isinstance(i, int)), default="?")
    return f"iteration {last}: {', '.join(held)}"


def check_run_folder(out_dir: Path, *, resume: bool | str, overwrite: bool,
                     say: typing.Callable[[str], None], move: bool = True) -> None:
    """Refuse a fresh run into a folder that holds one (UsageError, exit 2, nothing changed);
    with `overwrite`, move the earlier run's files (RUN_FILES) to OUT/replaced-DATE-TIME/
    first (`move`: on rank 0 only). Nothing is ever deleted: remove that folder when sure."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: give one")
    held = None if resume else held_run(out_dir)
    if held is None:
        return
    aside = out_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    if not overwrite:
        raise UsageError(f"{out_dir} holds a run ({held}): continue it with --resume, or start "
                         f"afresh with --overwrite (moves it to {aside.parent}/replaced-DATE-TIME/)")
    if not move:
        return
    with run_folder_lock(out_dir):  # not while another training uses the folder
        aside.mkdir()
        for name in RUN_FILES:
            if (out_dir / name).exists():
                os.replace(out_dir / name, aside / name)
    say(f"--overwrite: the earlier run ({held}) moved to {aside}")


# What --resume may change: the schedule (recomputed from the resumed iteration: the poly lr of
# the new values at that iteration), how the run is executed, logged and validated. Anything
# else (the network, the data, its order and pipeline, the loss, SGD's momentum and weight
# decay, the seed) makes another run than the one resumed: refused.
RESUMABLE = ("train.lr", "train.min_lr", "train.lr_power", "train.warmup_iters",
             "train.warmup_ratio", "train.epochs", "train.iters_per_epoch", "max_iters",
             "train.amp", "train.channels_last", "train.compile", "train.deterministic",
             "train.norm", "train.log_interval", "train.val_interval",
             "train.checkpoint_interval", "data.num_workers", "data.on_bad", "data.val_split",
             "test.")


def resume_changes(checkpoint: dict, cfg: configs.Config, max_iters: int,
                   path: Path) -> list[str]:
    """What resuming a training `checkpoint` with `cfg` and a schedule of `max_iters` changes
    ("key old -> new" each, applied by the loop), or a UsageError naming the first fields that
    cannot change. `path` names the checkpoint."""
    stored = checkpoint.get("config")
    from upernet_ref.checkpoints import differences
    changes = differences(from_dict(stored, where=str(path)), cfg) \
        if stored is not None else []
    if checkpoint.get("max_iters", max_iters) != max_iters:
        changes.append(("max_iters", checkpoint["max_iters"], max_iters))
    refused = [c for c in changes if not c[0].startswith(RESUMABLE)]
    if refused:
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in refused[:3])
        raise UsageError(f"--resume {path}: {said}{' and more' if len(refused) > 3 else ''} "
                         f"would make another run than the one resumed; resume without them, or "
                         f"train afresh (another --out, or --overwrite)")
    return [f"{k} {a!r} -> {b!r}" for k, a, b in changes]


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
