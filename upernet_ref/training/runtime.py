"""The training process's run-time state: seeds, determinism, RNG snapshots, mixed precision.

Each serves one promise of the loop (`trainer.train`): runs are repeatable (`seed_everything`,
`set_deterministic`), a resumed run continues exactly where it stopped (`rng_state` /
`set_rng_state`, saved for every process), nothing non-finite is ever saved
(`check_finite_state`), and `train.amp` means one thing everywhere (`autocast`, `grad_scaler`).
"""
from __future__ import annotations

import contextlib
import os
import random
import typing

import numpy as np
import torch
from torch import nn

from upernet_ref.errors import NonFiniteLossError


def _extremes(v: torch.Tensor) -> torch.Tensor:
    """What decides whether `v` (floating, not empty) is finite: its minimum and maximum (a NaN
    propagates to both, an infinity is one of them; float8 has no aminmax: all its values). No
    boolean copy of the weights: ~100x faster than `isfinite(v).all()` on a freshly built R-101
    (seconds per checkpoint load otherwise)."""
    return torch.stack(v.aminmax()) if v.element_size() > 1 else v


def non_finite_tensors(state_dict: typing.Mapping[str, typing.Any]) -> list[str]:
    """Names of the floating-point tensors in `state_dict` holding a NaN or an infinity."""
    return [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.numel() and not bool(torch.isfinite(_extremes(v)).all())]


def check_finite_state(model: nn.Module, iteration: int, kept: str) -> None:
    """Stop (NonFiniteLossError) when a weight or buffer of `model` holds a NaN or an inf.

    A diverging run can keep a finite loss while BatchNorm's `running_var` overflows (the
    training loss uses the batch's statistics, evaluation the running ones): such a model would
    be saved as "the last good checkpoint" and predict garbage. One fused reduction, one sync.
    `kept` says which checkpoint is left (for the message).
    """
    tensors = [_extremes(t) for t in model.state_dict().values() if t.is_floating_point() and t.numel()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
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


def set_deterministic(enabled: bool, device: torch.device) -> tuple:
    """Deterministic kernels (and seeded data order) for bit-for-bit repeatable runs; returns
    the flags as they were, for `restore_deterministic`.

    On CUDA some backward kernels used here (bilinear upsampling, adaptive pooling) have no
    deterministic version; `warn_only=True` keeps them with a warning instead of failing.
    """
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled
    return before


def restore_deterministic(before: tuple) -> None:
    """Put back every global flag `set_deterministic` touched (torch's deterministic-algorithms
    switch, cuDNN's deterministic and benchmark flags)."""
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
    """The autocast context of `train.amp`: none, bf16 or fp16 (checked in `TrainConfig`)."""
    return autocast_to(device, {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The AMP gradient scaler of `train.amp`: active for fp16 only (bf16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
