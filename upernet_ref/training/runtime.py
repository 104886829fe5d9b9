"""The training process's run-time state: seeds, determinism, RNG snapshots, mixed precision,
the per-device batch that fits in memory, and stopping on a signal.

These are the pieces of `train.py` that are not the loop itself. Each serves one promise of the
trainer: runs are repeatable (`seed_everything`, `set_deterministic`), a resumed
run continues exactly where it stopped (`rng_state` / `set_rng_state`, saved for every process),
the published global batch is kept on whatever memory there is (`choose_per_device_batch`), and
no work is lost when a job is pre-empted (`StopFlag`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import sys
import threading
import typing
from pathlib import Path

import numpy as np
import torch
from torch import nn

from upernet_ref.configs import Config
from upernet_ref.errors import UsageError


def check_finite_state(model: nn.Module, iteration: int, kept: str) -> None:
    """Stop (NonFiniteLossError) when a weight or buffer of `model` holds a NaN or an inf.

    A diverging run can keep a finite loss while BatchNorm's `running_var` overflows (the
    training loss uses the batch's statistics, evaluation the running ones): such a model would
    be saved as "the last good checkpoint" and predict garbage. One fused reduction, one sync.
    `kept` says which checkpoint is left (for the message).
    """
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    from upernet_ref.checkpoints import non_finite_tensors
    from upernet_ref.training.step import NonFiniteLossError  # step imports this module
    bad = non_finite_tensors(model.state_dict())
    raise NonFiniteLossError(
        f"non-finite weights or BatchNorm statistics after iteration {iteration} "
        f"({len(bad)} tensor(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
        f"stopped before saving them; {kept}. Try a lower --train.lr or --train.amp=none")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """Deterministic kernels (and seeded data order) for bit-for-bit repeatable runs.

    On CUDA some backward kernels used here (bilinear upsampling, adaptive pooling) have no
    deterministic version; `warn_only=True` keeps them with a warning instead of failing.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> typing.Iterator[None]:
    """`set_deterministic` for the duration of a block; every global flag it touches (torch's
    deterministic-algorithms switch, cuDNN's deterministic and benchmark flags) is put back."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_deterministic(enabled, device)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def rng_state() -> dict[str, typing.Any]:
    """A snapshot of every random generator this process uses (saved in checkpoints).

    Only tensors, numbers and tuples, so that `torch.load(weights_only=True)` reads it back
    (checkpoints are never unpickled with code execution; see `checkpoints`): numpy's MT19937
    state, an ndarray in `np.random.get_state()`, is stored as an int64 tensor.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, typing.Any]) -> None:
    """Restore a `rng_state()` snapshot, or one saved before numpy's state became a tensor
    (then `state["numpy"]` is `np.random.get_state()`'s tuple itself)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"],
                       np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`'s type; no autocast (float32) when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of `train.amp`: none, bf16 or fp16."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"train.amp must be none, bf16 or fp16, got {amp!r}")
    return autocast_to(device, {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp])


# --------------------------------------------------------------------------------------------
# The per-device batch


def largest_fitting_batch(candidates: typing.Iterable[int],
                          fits: typing.Callable[[int], bool]) -> int | None:
    """The first of `candidates` (largest first) for which `fits(batch)` is True, else None."""
    for batch in candidates:
        if fits(batch):
            return batch
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA allocation failure: torch's OutOfMemoryError, or cuBLAS / cuDNN failing to get
    their workspace (raised as a plain RuntimeError)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower()
                                              or "STATUS_ALLOC_FAILED" in text)


def choose_per_device_batch(model: nn.Module, cfg: Config, device: torch.device,
                            share: int, smallest: int = 1, headroom: float = 0.9) -> int:
    """The largest divisor of `share` (this process's part of the global batch) whose training
    step fits in memory.

    On CPU: the full share (memory is rarely the limit there). On CUDA: run the trainer's own
    step (`step.train_step`: forward, the configuration's loss, backward, the SGD update with its
    momentum buffers) on random data at the crop size for each divisor, largest first. A batch
    fits if it does not run out of memory and its peak, plus what DDP adds later (its gradient
    buckets, about one more copy of the weights), stays under `headroom` of the device's memory.
    The model's weights, BN statistics and the random state are left as they were.
    """
    from upernet_ref.training.schedule import build_optimizer
    from upernet_ref.training.step import train_step

    if device.type != "cuda":
        return share
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h, w = cfg.data.crop_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = headroom * torch.cuda.get_device_properties(device).total_memory
    batch_norms = [m for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def fits(batch: int) -> bool:
        optimizer = build_optimizer(model, cfg.train)  # fresh: no momentum left from a probe
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        images = masks = None
        if batch == 1:  # allowed with SyncBN (converted later); plain BN cannot train on 1 image,
            for m in batch_norms:  # so probe it with running statistics: the same memory
                m.eval()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            images = torch.randn(batch, 3, h, w, device=device)
            masks = torch.randint(0, cfg.data.num_classes, (batch, h, w), device=device)
            train_step(model, (images, masks), optimizer, scaler, cfg, check_finite=False)
            return torch.cuda.max_memory_allocated(device) + weight_bytes <= limit
        except RuntimeError as err:
            if is_out_of_memory(err):
                return False
            raise
        finally:
            for m in batch_norms:
                m.train()
            model.zero_grad(set_to_none=True)
            optimizer = scaler = images = masks = None
            torch.cuda.empty_cache()

    divisors = [d for d in range(share, 0, -1) if share % d == 0 and d >= min(smallest, share)]
    with torch.random.fork_rng(devices=[device]):
        chosen = largest_fitting_batch(divisors, fits)
    with torch.no_grad():  # the probes' updates undone
        model.load_state_dict(saved)
    if chosen is None:
        raise RuntimeError(f"even a per-device batch of {smallest} at crop {h}x{w} does not fit "
                           f"in {headroom:.0%} of the memory of {device}; try --train.amp=bf16 "
                           f"or a smaller crop")
    return chosen


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
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this "
              f"iteration, then stopping (send it again to stop at once)", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
