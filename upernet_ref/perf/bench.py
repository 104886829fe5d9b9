"""Speed and memory figures (`upernet bench`).

    upernet bench --config upernet_r50_os8_ade20k --size 512x512 --mode both --fast \\
        --warmup 1 --repeats 3 --json bench.json

What is measured (per configuration, input size and batch):

- GMACs: multiply-accumulates per image of one eval-mode forward, counted by running the model
  on the meta device (`flops.count_macs`; convolutions and matrix products only).
- Inference: latency of one batch = the median over `repeats` timed forwards after `warmup`
  untimed ones (`torch.no_grad`, eval mode; CUDA synchronised); images/s = batch / latency.
  Also the median process CPU time per batch (`time.process_time`, all threads): on a shared
  machine the wall time includes waiting for other processes, the CPU time does not.
- Training: the trainer's own step (`step.train_step`: forward in train mode with the auxiliary
  head under the configuration's autocast, its loss with class weights / OHEM / loss weights /
  ignore index, backward, its SGD from `schedule.build_optimizer`), timed the same way; train
  images/s = train batch / step time. BatchNorm in train mode needs > 1 value per channel at the
  PPM's 1x1 pool, so the train batch is at least 2. Override the configuration as for
  training (`--train.amp=bf16`, `--train.ohem=true`, ...).
- Peak memory: CUDA: `torch.cuda.max_memory_allocated` over the phase (weights included).
  CPU: the peak resident set size (Linux VmHWM, reset before each phase by writing 5 to
  /proc/self/clear_refs) minus the resident set size before the model was built, i.e. weights
  + activations + workspace, like the CUDA figure. Falls back to `ru_maxrss` when the peak
  cannot be reset (then a phase only shows if it exceeds every earlier one).
- MFU (CUDA): achieved FLOP/s (2 x MACs x images/s; x 3 for a training step, forward +
  backward) over the device's dense bf16/fp16 tensor-core peak from `hardware.PEAK_TFLOPS`
  (matched on the device name, `hardware.peak_tflops_for_name`; `--peak-tflops` for other
  GPUs). The eager rows use the same bf16 peak, so eager and fast MFUs compare directly.
- `--fast`: the same figures for the fast path: `fast.fast_inference_model` for inference
  (BatchNorm folded, channels_last, autocast, torch.compile as decided for the device), and
  the same training step with channels_last + autocast (+ compile) over the configuration's
  (`fast.default_fast_settings`, `FastSettings.train_overrides`, as `upernet train --fast`). With
  torch.compile the first (compiling) call is never timed; if compiling fails, the fast path
  runs uncompiled and the JSON says why (`compile_error`, `train_compile_error`).
- CUDA: `torch.backends.cudnn.benchmark` is on during the run (as in training); "eager fp32"
  means PyTorch's defaults, under which cuDNN convolutions use TF32 tensor cores
  (`torch.backends.cudnn.allow_tf32`, recorded in `machine`).
- A phase that runs out of GPU memory is recorded in `errors` (e.g. `{"train": "CUDA out of
  memory ..."}`) with its figures left None; the other phases still run.
"""
from __future__ import annotations

import resource
import statistics
import time
import typing

import torch
from torch import nn

from upernet_ref import configs
from upernet_ref.configs import Config
from upernet_ref.perf.flops import count_macs
from upernet_ref.perf.fast import FastSettings, default_fast_settings, error_summary, fast_inference_model
from upernet_ref.perf.hardware import device_peak_tflops, machine_info
from upernet_ref.model.upernet import build_model
from upernet_ref.training.schedule import build_optimizer
from upernet_ref.training.step import train_step


def model_flops_utilization(gmacs: float, images_per_s: float | None,
                            peak_tflops: float | None, factor: int = 1) -> float | None:
    """Achieved FLOP/s over the peak: factor x 2 x GMACs x 1e9 x images/s / (peak x 1e12).

    `factor` is 3 for a training step (the backward costs about twice the forward). None when
    the peak or the speed is unknown.
    """
    if peak_tflops is None or images_per_s is None:
        return None
    return factor * 2 * gmacs * 1e9 * images_per_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------
# Memory

def _rss_kb(field: str = "VmRSS") -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of a phase in MB (see the module docstring for the method)."""

    def __init__(self, device: torch.device, baseline_kb: int | None):
        self.device = device
        self.baseline_kb = baseline_kb or 0
        self.method = ""

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS, Linux >= 4.0
            self.method = "peak RSS (VmHWM, reset per phase) - RSS before the model was built"
        except OSError:
            self.method = "ru_maxrss (process-lifetime peak) - RSS before the model was built"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak_kb = _rss_kb("VmHWM") if self.method.startswith("peak RSS") else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return (peak_kb - self.baseline_kb) / 1024


# --------------------------------------------------------------------------------------------
# Timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: typing.Callable[[], typing.Any], device: torch.device, warmup: int,
               repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of `repeats` calls of `fn` after `warmup` untimed calls."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warmup_s = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(repeats):
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"median_s": statistics.median(walls), "min_s": min(walls),
            "cpu_s": statistics.median(cpus), "warmup_s": warmup_s, "runs_s": walls}


def bench_inference(model: nn.Module, images: torch.Tensor, device: torch.device,
                    warmup: int, repeats: int, meter: MemoryMeter) -> dict[str, typing.Any]:
    """Latency, images/s and peak memory of `model(images)` under no_grad."""
    meter.reset()
    with torch.no_grad():
        t = time_calls(lambda: model(images), device, warmup, repeats)
    batch = images.shape[0]
    return {"latency_ms": 1000 * t["median_s"], "latency_min_ms": 1000 * t["min_s"],
            "cpu_ms": 1000 * t["cpu_s"], "images_per_s": batch / t["median_s"],
            "first_calls_s": t["warmup_s"], "runs_ms": [1000 * r for r in t["runs_s"]],
            "peak_memory_mb": meter.peak_mb()}


def bench_training(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   device: torch.device, warmup: int, repeats: int, meter: MemoryMeter,
                   cfg: Config, settings: FastSettings | None = None) -> dict[str, typing.Any]:
    """Time the trainer's own step (`step.train_step`): the configuration's loss (class weights,
    OHEM, loss weights, ignore index), autocast and channels_last, and its SGD
    (`schedule.build_optimizer`). With `settings`, the fast path's choices override those
    (`FastSettings.train_overrides`).

    With compile, the first step (which compiles) is one of the warmup steps and always
    untimed; if it fails, the steps run uncompiled and `train_compile_error` says why.
    """
    if settings is not None:
        cfg = configs.override(cfg, settings.train_overrides())
    model.train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")

    def step() -> None:
        train_step(forward, (images, labels), optimizer, scaler, cfg)

    meter.reset()
    compile_error, first_s = None, 0.0
    if forward is not model:
        start = time.perf_counter()
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - torch.compile unavailable: run uncompiled
            compile_error = error_summary(err)
        if compile_error is not None:
            forward = model
        _sync(device)
        first_s, warmup = time.perf_counter() - start, max(warmup - 1, 0)
    t = time_calls(step, device, warmup, repeats)
    batch = images.shape[0]
    figures = {"train_step_ms": 1000 * t["median_s"], "train_step_min_ms": 1000 * t["min_s"],
               "train_cpu_ms": 1000 * t["cpu_s"], "train_images_per_s": batch / t["median_s"],
               "train_first_calls_s": first_s + t["warmup_s"],
               "train_runs_ms": [1000 * r for r in t["runs_s"]],
               "train_peak_memory_mb": meter.peak_mb(),
               "train_settings": train_settings_text(cfg, compiled=forward is not model),
               "train_compile_error": compile_error}
    return figures


def train_settings_text(cfg: Config, compiled: bool) -> str:
    """E.g. "bf16 autocast, channels_last, torch.compile" or "fp32, NCHW"."""
    amp = "fp32" if cfg.train.amp == "none" else f"{cfg.train.amp} autocast"
    return (f"{amp}, {'channels_last' if cfg.train.channels_last else 'NCHW'}"
            f"{', torch.compile' if compiled else ''}")


# --------------------------------------------------------------------------------------------
# The benchmark

def run_bench(cfg: Config, device: str | torch.device = "cpu", batch: int = 1,
              size: tuple[int, int] | None = None, mode: str = "infer", fast: bool = False,
              warmup: int = 1, repeats: int = 3, dtype: str = "auto",
              compile: str = "auto", seed: int = 0,
              peak_tflops: float | None = None) -> dict[str, typing.Any]:
    """All the figures as one JSON-able dict (see the module docstring).

    `peak_tflops` overrides the `hardware.PEAK_TFLOPS` entry of the device (for MFU).
    """
    device = torch.device(device)
    if mode not in ("infer", "train", "both"):
        raise ValueError(f"bench: mode must be infer, train or both, got {mode!r}")
    if batch < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"bench: need batch >= 1, warmup >= 0, repeats >= 1; got {batch}, "
                         f"{warmup}, {repeats}")
    size = tuple(size or cfg.data.crop_size)
    with torch.device("meta"):
        meta_model = build_model(cfg)
    gmacs = count_macs(meta_model.eval(), size) / 1e9
    train_gmacs = count_macs(meta_model.train(), size) / 1e9

    benchmark_before = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: fastest kernels, as in training
    try:
        return _run_bench(cfg, device, batch, size, mode, fast, warmup, repeats, dtype, compile,
                          seed, peak_tflops, gmacs, train_gmacs)
    finally:
        torch.backends.cudnn.benchmark = benchmark_before


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _run_bench(cfg, device, batch, size, mode, fast, warmup, repeats, dtype, compile, seed,
               peak_tflops, gmacs, train_gmacs) -> dict[str, typing.Any]:
    baseline_kb = _rss_kb()
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    meter = MemoryMeter(device, baseline_kb if device.type == "cpu" else None)
    generator = torch.Generator().manual_seed(seed)
    peak = peak_tflops if peak_tflops is not None else device_peak_tflops(device)
    errors: dict[str, str] = {}
    result: dict[str, typing.Any] = {
        "config": cfg.name, "device": str(device), "size": list(size), "batch": batch,
        "mode": mode, "warmup": warmup, "repeats": repeats, "gmacs": gmacs,
        "train_gmacs": train_gmacs, "latency_ms": None, "images_per_s": None,
        "train_images_per_s": None, "peak_memory_mb": None, "mfu": None,
        "peak_tflops": peak, "machine": machine_info(device), "errors": errors,
    }
    settings = default_fast_settings(device)
    if dtype != "auto":
        settings = FastSettings({"float32": None, "bfloat16": torch.bfloat16,
                                 "float16": torch.float16}[dtype], settings.channels_last,
                                settings.compile)
    if compile != "auto":
        settings = FastSettings(settings.dtype, settings.channels_last, compile == "on")
    # With torch.compile the first call compiles: never time it.
    fast_warmup = max(warmup, 1) if settings.compile else warmup

    def attempt(phase: str, phase_batch: int, fn: typing.Callable[[], dict]) -> dict | None:
        """fn()'s figures, or None when the phase does not fit in GPU memory (recorded)."""
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as err:
            errors[phase] = f"CUDA out of memory at batch {phase_batch}: {error_summary(err)}"
        _free_memory(device)  # outside the except block: the failed phase's tensors are gone
        return None

    train_batch = max(batch, 2)
    if mode in ("infer", "both"):
        images = torch.randn(batch, 3, *size, generator=generator).to(device)
        model.eval()
        figures = attempt("infer", batch, lambda: bench_inference(
            model, images, device, warmup, repeats, meter))
        if figures is not None:
            result.update(figures)
            result["mfu"] = model_flops_utilization(gmacs, result["images_per_s"], peak)
        result["memory_method"] = meter.method
        if fast:
            def fast_phase() -> dict:
                fast_model = fast_inference_model(model, device, dtype=settings.dtype,
                                                  channels_last=settings.channels_last,
                                                  compile=settings.compile)
                figures = bench_inference(fast_model, images, device, fast_warmup, repeats,
                                          meter)
                figures["settings"] = fast_model.settings.describe()
                figures["compile_error"] = fast_model.compile_error
                return figures

            figures = attempt("fast_infer", batch, fast_phase)
            fast_figures: dict[str, typing.Any] = {"settings": settings.describe()}
            if figures is not None:
                fast_figures.update(figures)
                fast_figures["mfu"] = model_flops_utilization(gmacs, figures["images_per_s"], peak)
                if result["images_per_s"]:
                    fast_figures["speedup"] = figures["images_per_s"] / result["images_per_s"]
            result["fast"] = fast_figures
        del images
        _free_memory(device)
    if mode in ("train", "both"):
        images = torch.randn(train_batch, 3, *size, generator=generator).to(device)
        labels = torch.randint(0, cfg.model.num_classes, (train_batch, *size),
                               generator=generator).to(device)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        result["train_batch"] = train_batch
        figures = attempt("train", train_batch, lambda: bench_training(
            model, images, labels, device, warmup, repeats, meter, cfg))
        if figures is not None:
            result.update(figures)
            result["train_mfu"] = model_flops_utilization(
                train_gmacs, result["train_images_per_s"], peak, factor=3)
        else:
            result.update(train_step_ms=None, train_mfu=None, train_peak_memory_mb=None)
        if result["peak_memory_mb"] is None:
            result["peak_memory_mb"] = result["train_peak_memory_mb"]
        result["memory_method"] = meter.method
        if fast:
            del model  # the eager run's weights, gradients: the fast run starts from `state`
            _free_memory(device)
            torch.manual_seed(seed)
            model = build_model(cfg).to(device)
            model.load_state_dict(state)
            fast_cfg = configs.override(cfg, settings.train_overrides())
            figures = attempt("fast_train", train_batch, lambda: bench_training(
                model, images, labels, device, fast_warmup, repeats, meter, cfg,
                settings=settings))
            fast_figures = result.setdefault("fast", {})
            fast_figures["train_settings"] = train_settings_text(fast_cfg, settings.compile)
            if figures is not None:
                fast_figures.update(figures)
                fast_figures["train_mfu"] = model_flops_utilization(
                    train_gmacs, figures["train_images_per_s"], peak, factor=3)
                if result["train_images_per_s"]:
                    fast_figures["train_speedup"] = (figures["train_images_per_s"]
                                                     / result["train_images_per_s"])
    return result


def format_table(result: dict[str, typing.Any]) -> str:
    """A plain-text table of the figures: one row per path (eager, fast) and phase."""
    m = result["machine"]
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m['threads']} threads)"
    lines = [f"{result['config']}  input {result['batch']}x3x{result['size'][0]}x{result['size'][1]}"
             f"  {result['gmacs']:.1f} GMACs/image  on {result['device']}: {where}, "
             f"torch {m['torch']}",
             f"{'path':<34} {'phase':<6} {'ms/batch':>9} {'cpu ms':>9} {'img/s':>8} "
             f"{'peak MB':>8} {'MFU':>6}"]

    def row(name: str, phase: str, figures: dict, prefix: str, error: str | None) -> None:
        ms = figures.get(f"{prefix}step_ms" if prefix else "latency_ms")
        if ms is None:
            lines.append(f"{name:<34} {phase:<6} {error or 'not measured'}")
            return
        mfu = figures.get(f"{prefix}mfu")
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        lines.append(f"{name:<34} {phase:<6} {ms:9.1f} {figures[prefix + 'cpu_ms']:9.1f} "
                     f"{figures[prefix + 'images_per_s']:8.2f} "
                     f"{figures[prefix + 'peak_memory_mb']:8.0f} {mfu_text:>6}")

    fast, errors = result.get("fast", {}), result.get("errors", {})
    eager = "eager fp32" + (" (TF32 convs)" if m.get("tf32_convolutions") else "")
    if result["mode"] in ("infer", "both"):
        row(eager, "infer", result, "", errors.get("infer"))
        if fast:
            row("fast (--fast)", "infer", fast, "", errors.get("fast_infer"))
    if result["mode"] in ("train", "both"):
        row(f"{eager} (batch {result['train_batch']})", "train", result, "train_",
            errors.get("train"))
        if fast:
            row(f"fast (batch {result['train_batch']})", "train", fast, "train_",
                errors.get("fast_train"))
    if fast.get("settings"):
        lines.append(f"fast inference: {fast['settings']}")
    if fast.get("train_settings"):
        lines.append(f"fast training: {fast['train_settings']}")
    if "speedup" in fast:
        lines.append(f"fast inference speed-up: {fast['speedup']:.2f}x")
    if "train_speedup" in fast:
        lines.append(f"fast training speed-up: {fast['train_speedup']:.2f}x")
    for key in ("compile_error", "train_compile_error"):
        if fast.get(key):
            lines.append(f"torch.compile failed, measured uncompiled: {fast[key]}")
    lines.append(f"memory: {result.get('memory_method', '')}")
    return "\n".join(lines)
