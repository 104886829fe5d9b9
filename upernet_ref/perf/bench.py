"""Speed and memory figures (`upernet bench`).

    upernet bench --config upernet_r50_os8_ade20k --size 512x512 --mode both --fast \\
        --warmup 1 --repeats 5 --json bench.json
    upernet bench --config upernet_r50_os8_ade20k --mode train --train.amp=bf16

What is measured (per configuration, input size and batch):

- GMACs: multiply-accumulates per image of one eval-mode forward, counted by running the model
  on the meta device (`flops.count_macs`; convolutions and matrix products only).
- Inference: latency of one batch = the median over `repeats` timed forwards after `warmup`
  untimed ones (`torch.no_grad`, eval mode; CUDA synchronised); images/s = batch / latency.
  Also the median process CPU time per batch (`time.process_time`, all threads): on a shared
  machine the wall time includes waiting for other processes, the CPU time does not.
- Training: the trainer's own step (`trainer.train_step`: forward in train mode with the auxiliary
  head under the configuration's autocast, its loss with class weights / OHEM / loss weights /
  ignore index, backward, its SGD from `schedule.build_optimizer`), timed the same way; train
  images/s = train batch / step time. BatchNorm in train mode needs > 1 value per channel at the
  PPM's 1x1 pool, so the train batch is at least 2. Override the configuration as for
  training (`--train.amp=bf16`, `--train.ohem=true`, ...).
- `--fast`: the same figures for the fast path: `fast.fast_inference_model` for inference
  (BatchNorm folded, channels_last, autocast, torch.compile as decided for the device), and
  the same training step with channels_last + autocast (+ compile) over the configuration's
  (`fast.default_fast_settings`, `FastSettings.train_overrides`, as `upernet train --fast`), and
  on the CPU the logits upsampled in float32 and channels_last conv inputs
  (`fast.fast_training_model`). Both training paths start from the same weights and batch, and
  each reports its first step's loss (`train_first_loss`): the fast step checked against eager.
  The two paths are timed *interleaved*, eager, fast, eager, fast, ..., and the speed-up is the
  median of the per-round ratios eager time / fast time, for the wall time and for the process
  CPU time: a change of load on a shared machine then hits both paths of a round alike instead
  of deciding the speed-up (timed one after the other, one run here gave 0.56x and another
  4.17x for the same build). With torch.compile the first (compiling) call is never timed; if
  compiling fails, the fast path runs uncompiled and the JSON says why (`compile_error`,
  `train_compile_error`).
- Peak memory of a path: its own weights and buffers (and SGD momentum for training) plus the
  most any of its calls added to what was in use when the call started. CUDA:
  `torch.cuda.max_memory_allocated` - `memory_allocated` before the call. CPU: the peak resident
  set size (Linux VmHWM, reset before each call by writing 5 to /proc/self/clear_refs) - the
  resident set size before it; falls back to `ru_maxrss` when the peak cannot be reset. So the
  figure of one path does not count the other path's weights, resident while they interleave.
- `--int8`: a third interleaved inference path, the int8 model (`int8.int8_inference_model`:
  PT2E quantization with the x86 inductor quantizer, calibrated on a few batches, compiled with
  freezing), and its accuracy next to fp32 and the bf16 fast path on the committed demo
  checkpoint (`demo_checkpoint_accuracy`: argmax agreement with fp32 eager and mIoU on the demo
  val images), since the benchmark's own model has random weights, whose argmax means nothing.
- Compile cost: the fast path is compiled on its first call here (`compile_after_s=0`), never
  timed; `compile_s` is that call, `break_even_images` how many images the compiled path must
  process before its speed-up has paid for the compile (compile_s / (eager - fast) s per image);
  `compile_rule` says why the device compiles or not (`fast.compile_rule`).
- Fraction of the peak (CPU): achieved FLOP/s over an *estimate* of the processor's peak for
  the arithmetic of the path (`hardware.cpu_peak`: cores x clock x FLOP per cycle from the
  detected vector features): fp32 for eager, bf16 for the bf16 fast path, int8 ops for int8.
  Twice: by wall time over the peak of all the cores (`peak_fraction`), and by process CPU
  time over the peak of one core (`cpu_peak_fraction`: FLOP per core-second the process got;
  on a loaded machine the wall figure mostly measures the other processes).
- MFU (CUDA): achieved FLOP/s (2 x MACs x images/s; x 3 for a training step, forward +
  backward) over the device's dense bf16/fp16 tensor-core peak from `hardware.PEAK_TFLOPS`
  (matched on the device name, `hardware.peak_tflops_for_name`; `--peak-tflops` for other
  GPUs). The eager rows use the same bf16 peak, so eager and fast MFUs compare directly.
- CUDA: `torch.backends.cudnn.benchmark` is on during the run (as in training); "eager fp32"
  means PyTorch's defaults, under which cuDNN convolutions use TF32 tensor cores
  (`torch.backends.cudnn.allow_tf32`, recorded in `machine`).
- A path that runs out of GPU memory is recorded in `errors` (e.g. `{"train": "CUDA out of
  memory ..."}`) with its figures left None; the other paths still run.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import time
import typing

import torch
from torch import nn

from upernet_ref import configs
from upernet_ref.configs import Config
from upernet_ref.model.upernet import build_model
from upernet_ref.perf.fast import (FastModel, FastSettings, compile_rule,
                                   default_fast_settings, error_summary, fast_inference_model,
                                   fast_training_model)
from upernet_ref.perf.flops import count_macs
from upernet_ref.perf.late_upsampling import late_upsampling
from upernet_ref.perf.hardware import CpuPeak, cpu_peak, device_peak_tflops, machine_info
from upernet_ref.training.runtime import grad_scaler
from upernet_ref.training.schedule import build_optimizer
from upernet_ref.training.trainer import train_step


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
    """The memory one call adds to what was in use when it started, in MB (see the module
    docstring for the method)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self._start = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = ("torch.cuda.max_memory_allocated during a call - allocated before it "
                           "+ the path's own weights (and optimizer state)")
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS, Linux >= 4.0
            self.method = ("peak RSS during a call (VmHWM, reset per call) - RSS before it + the "
                           "path's own weights (and optimizer state)")
        except OSError:
            self.method = ("ru_maxrss (process-lifetime peak) - RSS before a call + the path's "
                           "own weights (and optimizer state)")
        self._start = (_rss_kb() or 0) / 1024

    def added_mb(self) -> float:
        """Peak since `reset()` minus the usage at `reset()`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        peak_kb = _rss_kb("VmHWM") if self.method.startswith("peak RSS") else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return max(peak_kb / 1024 - self._start, 0.0)


def resident_mb(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Weights, buffers and optimizer state (SGD momentum) of one path, in MB."""
    tensors = {t.data_ptr(): t.numel() * t.element_size()
               for t in [*module.parameters(), *module.buffers()]}
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.update({t.data_ptr(): t.numel() * t.element_size()
                            for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(tensors.values()) / 2**20


# --------------------------------------------------------------------------------------------
# Timing: the paths of a phase (eager, fast) take turns

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


@dataclasses.dataclass
class TimedPath:
    """One measured path of a phase: its call, and per timed call the wall seconds, the process
    CPU seconds and the memory the call added."""
    call: typing.Callable[[], typing.Any]
    resident: typing.Callable[[], float] = lambda: 0.0  # its weights (+ momentum), MB
    first_calls_s: float = 0.0  # the untimed warm-up calls (compilation included)
    walls: list[float] = dataclasses.field(default_factory=list)
    cpus: list[float] = dataclasses.field(default_factory=list)
    added_mb: list[float] = dataclasses.field(default_factory=list)


def warm_up(path: TimedPath, device: torch.device, calls: int) -> None:
    """Run `calls` untimed calls (their total time goes to `first_calls_s`)."""
    start = time.perf_counter()
    for _ in range(calls):
        path.call()
    _sync(device)
    path.first_calls_s += time.perf_counter() - start


def measure_interleaved(paths: dict[str, TimedPath], device: torch.device, repeats: int,
                        meter: MemoryMeter, errors: dict[str, str], batch: int) -> None:
    """Time the paths in turn, `repeats` rounds of (eager, fast): a change of load on a shared
    machine then hits both alike, and the per-round ratios stay comparable. A path that runs
    out of GPU memory is recorded in `errors` and left out of the next rounds."""
    for _ in range(repeats):
        for name, path in paths.items():
            if name in errors:
                continue
            try:
                meter.reset()
                wall, cpu = time.perf_counter(), time.process_time()
                path.call()
                _sync(device)
                path.walls.append(time.perf_counter() - wall)
                path.cpus.append(time.process_time() - cpu)
                path.added_mb.append(meter.added_mb())
            except torch.cuda.OutOfMemoryError as err:
                errors[name] = f"CUDA out of memory at batch {batch}: {error_summary(err)}"
            _free_memory(device)  # outside the except block: the failed call's tensors are gone


def path_figures(path: TimedPath | None, batch: int, prefix: str = "") -> dict[str, typing.Any]:
    """Median / min wall ms, median CPU ms, images/s and peak MB of a measured path; None
    figures when it was not measured. `prefix` "train_" names the training figures."""
    ms_key = "train_step_ms" if prefix else "latency_ms"
    min_key = "train_step_min_ms" if prefix else "latency_min_ms"
    if path is None or not path.walls:
        return {ms_key: None, f"{prefix}images_per_s": None, f"{prefix}peak_memory_mb": None}
    median = statistics.median(path.walls)
    return {ms_key: 1000 * median, min_key: 1000 * min(path.walls),
            f"{prefix}cpu_ms": 1000 * statistics.median(path.cpus),
            f"{prefix}images_per_s": batch / median,
            f"{prefix}first_calls_s": path.first_calls_s,
            f"{prefix}runs_ms": [1000 * w for w in path.walls],
            f"{prefix}cpu_runs_ms": [1000 * c for c in path.cpus],
            f"{prefix}peak_memory_mb": path.resident() + max(path.added_mb)}


def paired_speedup(eager: TimedPath, fast: TimedPath, prefix: str = "") -> dict[str, typing.Any]:
    """The median over the interleaved rounds of eager time / fast time, wall and CPU."""
    pairs = list(zip(eager.walls, fast.walls, eager.cpus, fast.cpus))
    if not pairs:
        return {}
    walls = [e / f for e, f, _, _ in pairs]
    cpus = [e / f for _, _, e, f in pairs if f > 0]
    return {f"{prefix}speedup": statistics.median(walls),
            f"{prefix}cpu_speedup": statistics.median(cpus) if cpus else None,
            f"{prefix}speedup_runs": walls}


def prepare_training(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     device: torch.device, cfg: Config,
                     settings: FastSettings | None = None) -> tuple[TimedPath, dict[str, typing.Any]]:
    """The trainer's own step (`trainer.train_step`) as a timed path: the configuration's loss
    (class weights, OHEM, loss weights, ignore index), autocast and channels_last, and its SGD
    (`schedule.build_optimizer`). With `settings`, the fast path's choices override those
    (`FastSettings.train_overrides`, `fast.fast_training_model`). Returns
    the path and its description (`train_settings`, `train_compile_error`; once the first step
    has run, `train_first_loss`: its loss, which the bench's eager and fast paths compute from
    the same weights and batch, so that the fast step is checked against the eager one).

    With compile, the first step (which compiles) runs here, untimed; if it fails, the steps
    run uncompiled and `train_compile_error` says why.
    """
    applied: list[str] = []
    if settings is not None:
        cfg = configs.override(cfg, settings.train_overrides())
        model, applied = fast_training_model(model, settings, cfg.train.amp,
                                             cfg.train.channels_last)
    model.train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(model, cfg.train)
    scaler = grad_scaler(cfg.train.amp, device)
    state = {"forward": forward}
    described: dict[str, typing.Any] = {}

    def step() -> None:
        losses = train_step(state["forward"], (images, labels), optimizer, scaler, cfg)
        if "train_first_loss" not in described:  # from the weights both paths start from
            described["train_first_loss"] = float(losses.loss)

    path = TimedPath(step, resident=lambda: resident_mb(model, optimizer))
    compile_error = None
    if forward is not model:
        start = time.perf_counter()
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - torch.compile unavailable: run uncompiled
            compile_error = error_summary(err)
            state["forward"] = model
        _sync(device)
        path.first_calls_s = time.perf_counter() - start
    described.update(train_settings=train_settings_text(cfg, compiled=state["forward"] is not model,
                                                        extra=applied),
                     train_compile_error=compile_error)
    return path, described


def break_even_images(compile_s: float | None, eager_ms: float | None, fast_ms: float | None,
                      batch: int) -> float | None:
    """Images after which the compiled path's saving has paid for its compile: compile_s over
    the seconds saved per image; None when nothing was compiled or nothing is saved."""
    if compile_s is None or eager_ms is None or fast_ms is None or fast_ms >= eager_ms:
        return None
    return compile_s / ((eager_ms - fast_ms) / 1000 / batch)


def demo_checkpoint_accuracy(settings: FastSettings, calibration_images: int = 4,
                             val_images: int = 16) -> dict[str, typing.Any]:
    """fp32 eager, the fast path (`settings`, compiled as on a long run) and int8 on the
    committed demo checkpoint (`course.load_demo_checkpoint`, `upernet_small_demo`) over demo val
    at the configuration's base scale: per path its argmax agreement with fp32 eager and its
    mIoU; int8 calibrated on `calibration_images` demo *train* images."""
    from upernet_ref.course import load_demo_checkpoint
    from upernet_ref.data.transforms import test_transform
    from upernet_ref.demo_scenes import DemoScenes
    from upernet_ref.evaluation.evaluate import evaluate
    from upernet_ref.perf.int8 import int8_inference_model

    cfg = configs.get_config("upernet_small_demo")
    model = load_demo_checkpoint(build_model(cfg)).eval()
    size = tuple(cfg.data.base_scale[::-1])
    transform = test_transform(cfg.data)
    val = DemoScenes("val", num_samples=val_images, size=size, seed=0, transform=transform)
    train = DemoScenes("train", num_samples=calibration_images, size=size, seed=0,
                       transform=transform)
    images = [val[i][0].unsqueeze(0) for i in range(len(val))]
    paths = {"eager fp32": model,
             "fast": _fast_model(model, torch.device("cpu"), settings),
             "int8": int8_inference_model(model, [train[i][0].unsqueeze(0)
                                                  for i in range(len(train))])}
    with torch.no_grad():
        reference = [model(x)["out"].argmax(1) for x in images]
    rows = {}
    for name, net in paths.items():
        with torch.no_grad():
            same = sum(int((net(x)["out"].argmax(1) == ref).sum())
                       for x, ref in zip(images, reference))
        miou = evaluate(net, val, cfg, device="cpu", progress=False, num_workers=0)["miou"]
        rows[name] = {"agreement": same / sum(ref.numel() for ref in reference), "miou": miou}
    for row in rows.values():
        row["miou_change"] = row["miou"] - rows["eager fp32"]["miou"]
    rows["fast"]["settings"] = paths["fast"].settings.describe()
    return {"checkpoint": "upernet_ref/assets/upernet_small_demo.safetensors",
            "images": f"{val_images} demo val images at {size[0]}x{size[1]}", "paths": rows}


def _fast_model(model: nn.Module, device: torch.device, settings: FastSettings) -> FastModel:
    """The fast inference path with the bench's `settings`, compiled (where they say so) on its
    first call, which the bench does not time."""
    return fast_inference_model(model, device, dtype=settings.dtype,
                                channels_last=settings.channels_last, compile=settings.compile,
                                compile_after_s=0.0, late_upsampling=settings.late_upsampling)


def train_settings_text(cfg: Config, compiled: bool, extra: typing.Sequence[str] = ()) -> str:
    """E.g. "bf16 autocast, channels_last, torch.compile" or "fp32, NCHW"; `extra`: what
    `fast.fast_training_model` applied."""
    amp = "fp32" if cfg.train.amp == "none" else f"{cfg.train.amp} autocast"
    return ", ".join([amp, "channels_last" if cfg.train.channels_last else "NCHW", *extra,
                      *(["torch.compile"] if compiled else [])])


# --------------------------------------------------------------------------------------------
# The benchmark

def run_bench(cfg: Config, device: str | torch.device = "cpu", batch: int = 1,
              size: tuple[int, int] | None = None, mode: str = "infer", fast: bool = False,
              warmup: int = 1, repeats: int = 3, dtype: str = "auto",
              compile: str = "auto", seed: int = 0,
              peak_tflops: float | None = None, int8: bool = False) -> dict[str, typing.Any]:
    """All the figures as one JSON-able dict (see the module docstring).

    `peak_tflops` overrides the `hardware.PEAK_TFLOPS` entry of the device (for MFU); `int8`
    adds the int8 inference path (CPU) and the demo-checkpoint accuracy of the paths.
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
        if int8 and device.type != "cpu":
            raise ValueError("bench: the int8 path (inductor's x86 kernels) runs on the CPU only")
        return _run_bench(cfg, device, batch, size, mode, fast, warmup, repeats, dtype, compile,
                          seed, peak_tflops, gmacs, train_gmacs, int8)
    finally:
        torch.backends.cudnn.benchmark = benchmark_before


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _fast_settings(device: torch.device, dtype: str, compile: str) -> FastSettings:
    """The device's fast-path choices, with `--dtype` / `--compile` (of inference and of the
    training step) when not "auto"."""
    settings = default_fast_settings(device)
    if dtype != "auto":
        settings = dataclasses.replace(settings, dtype={"float32": None, "bfloat16": torch.bfloat16,
                                                        "float16": torch.float16}[dtype])
    if compile != "auto":  # inference and the training step alike
        on = compile == "on"
        settings = dataclasses.replace(settings, compile=on, train_compile=on,
                                       freezing=on and device.type == "cpu")
    return settings


@dataclasses.dataclass
class _Bench:
    """One benchmark run shared by its phases: the arguments, the fast-path settings, the CPU
    peak estimate (CPU only), and the figures so far (`result`, with `errors` in it)."""
    cfg: Config
    device: torch.device
    batch: int
    size: tuple[int, int]
    fast: bool
    warmup: int
    repeats: int
    seed: int
    gmacs: float
    train_gmacs: float
    peak: float | None  # TFLOP/s for MFU
    settings: FastSettings
    estimate: CpuPeak | None
    result: dict[str, typing.Any]
    errors: dict[str, str]
    meter: MemoryMeter
    generator: torch.Generator
    fast_gmacs: float | None = None  # what the fast path computes, where it differs (late
    fast_train_gmacs: float | None = None  # upsampling); None: the network's own

    @property
    def fast_warmup(self) -> int:
        """With torch.compile the first call compiles: never time it."""
        return max(self.warmup, 1) if self.settings.compile else self.warmup

    def attempt(self, phase: str, phase_batch: int, fn: typing.Callable[[], typing.Any]
                ) -> typing.Any:
        """fn()'s value, or None when it does not fit in GPU memory (recorded in `errors`)."""
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as err:
            self.errors[phase] = (f"CUDA out of memory at batch {phase_batch}: "
                                  f"{error_summary(err)}")
        _free_memory(self.device)  # outside the except block: the failed phase's tensors are gone
        return None

    def peak_fraction(self, figures: dict, arithmetic: str, prefix: str = "",
                      factor: int = 1, macs: float | None = None) -> None:
        """The path's share of the estimated CPU peak of its arithmetic (CPU only): by wall
        time (of all the cores), and by process CPU time (of the core-seconds the process
        really got: on a shared machine the steadier figure). `macs`: the GMACs per image the
        path computes (default: the network's)."""
        estimate = self.estimate
        if estimate is None:
            return
        if macs is None:
            macs = self.train_gmacs if prefix else self.gmacs
        figures[f"{prefix}peak_fraction"] = model_flops_utilization(
            macs, figures.get(f"{prefix}images_per_s"), estimate.tflops(arithmetic), factor)
        cpu_ms = figures.get(f"{prefix}cpu_ms")
        images = self.result.get("train_batch", self.batch) if prefix else self.batch
        figures[f"{prefix}cpu_peak_fraction"] = model_flops_utilization(
            macs, images / (cpu_ms / 1000) if cpu_ms else None,
            estimate.tflops(arithmetic) / estimate.cores, factor)
        figures[f"{prefix}peak_arithmetic"] = arithmetic


def _run_bench(cfg, device, batch, size, mode, fast, warmup, repeats, dtype, compile, seed,
               peak_tflops, gmacs, train_gmacs, int8) -> dict[str, typing.Any]:
    """The phases in order: inference (eager, fast, int8, interleaved), the demo-checkpoint
    accuracy (with `int8`), training (eager, fast, interleaved)."""
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    meter = MemoryMeter(device)
    generator = torch.Generator().manual_seed(seed)
    peak = peak_tflops if peak_tflops is not None else device_peak_tflops(device)
    errors: dict[str, str] = {}
    result: dict[str, typing.Any] = {
        "config": cfg.name, "device": str(device), "size": list(size), "batch": batch,
        "mode": mode, "warmup": warmup, "repeats": repeats, "interleaved": fast,
        "gmacs": gmacs, "train_gmacs": train_gmacs, "latency_ms": None, "images_per_s": None,
        "train_images_per_s": None, "peak_memory_mb": None, "mfu": None,
        "peak_tflops": peak, "machine": machine_info(device), "errors": errors,
    }
    estimate = cpu_peak() if device.type == "cpu" else None
    if estimate is not None:
        result["cpu_peak"] = dict(dataclasses.asdict(estimate), describe=estimate.describe(),
                                  **{f"{d}_tflops": estimate.tflops(d) for d in ("fp32", "bf16", "int8")})
    run = _Bench(cfg, device, batch, size, fast, warmup, repeats, seed, gmacs, train_gmacs, peak,
                 _fast_settings(device, dtype, compile), estimate, result, errors, meter,
                 generator)
    if fast and run.settings.late_upsampling:
        with torch.device("meta"):
            late = late_upsampling(build_model(cfg))
        run.fast_gmacs = result["fast_gmacs"] = count_macs(late.eval(), size) / 1e9
        run.fast_train_gmacs = result["fast_train_gmacs"] = count_macs(late.train(), size) / 1e9
    if mode in ("infer", "both"):
        _bench_inference(run, model, int8)
    if int8:
        result["demo_accuracy"] = demo_checkpoint_accuracy(run.settings)
    if mode in ("train", "both"):
        _bench_training(run, model)
    return result


def _bench_inference(run: _Bench, model: nn.Module, int8: bool) -> None:
    """Eager, fast (with `run.fast`) and int8 (with `int8`) inference, timed interleaved; their
    figures into `run.result` (the eager ones at the top level, "fast", "int8")."""
    result = run.result
    images = torch.randn(run.batch, 3, *run.size, generator=run.generator).to(run.device)
    model.eval()
    paths, fast_model, int8_model = _inference_paths(run, model, images, int8)
    for name, path in paths.items():
        run.attempt(name, run.batch, lambda: warm_up(
            path, run.device, run.warmup if name == "infer" else run.fast_warmup))
    measure_interleaved(paths, run.device, run.repeats, run.meter, run.errors, run.batch)
    result.update(path_figures(paths["infer"], run.batch))
    result["mfu"] = model_flops_utilization(run.gmacs, result["images_per_s"], run.peak)
    run.peak_fraction(result, "fp32")
    if run.fast:
        result["fast"] = _fast_inference_figures(run, paths, fast_model)
    if int8_model is not None and "int8_infer" not in run.errors:
        figures = path_figures(paths["int8_infer"], run.batch)
        figures.update(settings="BN folded, PT2E int8 (X86InductorQuantizer, calibrated on 2 "
                                "random batches), torch.compile with freezing",
                       quantize_s=int8_model.quantize_s, compile_s=int8_model.compile_s)
        run.peak_fraction(figures, "int8")
        if "infer" not in run.errors:
            figures.update(paired_speedup(paths["infer"], paths["int8_infer"]))
        result["int8"] = figures
    result["memory_method"] = run.meter.method
    del images, fast_model, int8_model, paths
    _free_memory(run.device)


def _inference_paths(run: _Bench, model: nn.Module, images: torch.Tensor, int8: bool
                     ) -> tuple[dict[str, TimedPath], FastModel | None, typing.Any]:
    """The inference paths on `images`: eager, the fast model (None when it does not fit) and
    the int8 model (calibrated on 2 random batches), each with its own weights' memory."""
    def forward(net: nn.Module) -> typing.Callable[[], typing.Any]:
        def call() -> typing.Any:
            with torch.no_grad():
                return net(images)
        return call

    settings = run.settings
    paths = {"infer": TimedPath(forward(model), resident=lambda: resident_mb(model))}
    fast_model = run.attempt("fast_infer", run.batch, lambda: _fast_model(
        model, run.device, settings)) if run.fast else None
    if fast_model is not None:
        paths["fast_infer"] = TimedPath(forward(fast_model),
                                        resident=lambda: resident_mb(fast_model))
    int8_model = None
    if int8:
        from upernet_ref.perf.int8 import int8_inference_model
        calibration = [torch.randn(run.batch, 3, *run.size, generator=run.generator)
                       for _ in range(2)]
        int8_model = int8_inference_model(model, calibration)
        paths["int8_infer"] = TimedPath(forward(int8_model),
                                        resident=lambda: resident_mb(int8_model.quantized))
    return paths, fast_model, int8_model


def _fast_inference_figures(run: _Bench, paths: dict[str, TimedPath],
                            fast_model: FastModel | None) -> dict[str, typing.Any]:
    """The fast path's settings and compile rule, and (when it ran) its figures, compile cost,
    speed-up over eager and break-even image count."""
    settings = run.settings
    figures: dict[str, typing.Any] = {"settings": settings.describe(),
                                      "compile_rule": compile_rule(run.device)[1]}
    if fast_model is None or "fast_infer" in run.errors:
        return figures
    figures.update(path_figures(paths["fast_infer"], run.batch))
    figures.update(settings=fast_model.settings.describe(),
                   compile_error=fast_model.compile_error,
                   compile_s=fast_model.compile_s if fast_model.compiled_shapes else None,
                   compiled_slower=bool(fast_model.slower_shapes),
                   mfu=model_flops_utilization(run.gmacs, figures["images_per_s"], run.peak))
    run.peak_fraction(figures, "bf16" if settings.dtype == torch.bfloat16 else "fp32",
                      macs=run.fast_gmacs)
    if "infer" not in run.errors:
        figures.update(paired_speedup(paths["infer"], paths["fast_infer"]))
        figures["break_even_images"] = break_even_images(
            figures["compile_s"], run.result["latency_ms"], figures["latency_ms"], run.batch)
    return figures


def _bench_training(run: _Bench, model: nn.Module) -> None:
    """The eager training step and (with `run.fast`) the fast one, from the same weights,
    timed interleaved on one random batch (at least 2 images); their figures into
    `run.result` (the eager ones at the top level, the fast ones in "fast")."""
    cfg, result = run.cfg, run.result
    train_batch = max(run.batch, 2)
    images = torch.randn(train_batch, 3, *run.size, generator=run.generator).to(run.device)
    labels = torch.randint(0, cfg.model.num_classes, (train_batch, *run.size),
                           generator=run.generator).to(run.device)
    result["train_batch"] = train_batch
    paths, described = _training_paths(run, model, images, labels)
    measure_interleaved(paths, run.device, run.repeats, run.meter, run.errors, train_batch)
    figures = path_figures(paths.get("train") if "train" not in run.errors else None,
                           train_batch, "train_")
    result.update(figures, **described.get("train", {}))
    result["train_mfu"] = model_flops_utilization(
        run.train_gmacs, result["train_images_per_s"], run.peak, factor=3)
    run.peak_fraction(result, "bf16" if cfg.train.amp == "bf16" else "fp32", "train_", factor=3)
    if result["peak_memory_mb"] is None:
        result["peak_memory_mb"] = result["train_peak_memory_mb"]
    result["memory_method"] = run.meter.method
    if not run.fast:
        return
    fast_cfg = configs.override(cfg, run.settings.train_overrides())
    figures = result.setdefault("fast", {})
    figures["train_settings"] = train_settings_text(fast_cfg, fast_cfg.train.compile)
    if "fast_train" in paths and "fast_train" not in run.errors:
        figures.update(path_figures(paths["fast_train"], train_batch, "train_"),
                       **described["fast_train"])
        figures["train_mfu"] = model_flops_utilization(
            run.train_gmacs, figures["train_images_per_s"], run.peak, factor=3)
        run.peak_fraction(figures, "bf16" if fast_cfg.train.amp == "bf16" else "fp32",
                          "train_", factor=3, macs=run.fast_train_gmacs)
        if "train" in paths and "train" not in run.errors:
            figures.update(paired_speedup(paths["train"], paths["fast_train"], "train_"))


def _training_paths(run: _Bench, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[dict[str, TimedPath], dict[str, dict[str, typing.Any]]]:
    """The prepared, warmed-up training steps ("train", and "fast_train" on a copy of the
    model rebuilt with the same weights) and what each describes of itself; a step that does
    not fit in GPU memory is left out (recorded in `run.errors`)."""
    train_batch = images.shape[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # both start from it
    paths: dict[str, TimedPath] = {}
    described: dict[str, dict[str, typing.Any]] = {}
    for name, settings in (("train", None), ("fast_train", run.settings)):
        if name == "fast_train" and not run.fast:
            continue
        if name == "fast_train":
            torch.manual_seed(run.seed)
            model = build_model(run.cfg).to(run.device)
            model.load_state_dict(state)
        prepared = run.attempt(name, train_batch, lambda: prepare_training(
            model, images, labels, run.device, run.cfg, settings=settings))
        if prepared is not None:
            paths[name], described[name] = prepared
            calls = run.fast_warmup if name == "fast_train" else run.warmup
            if paths[name].first_calls_s:  # the compiling step was the first warm-up call
                calls = max(calls - 1, 0)
            run.attempt(name, train_batch, lambda: warm_up(paths[name], run.device, calls))
    return paths, described


# --------------------------------------------------------------------------------------------
# The table

def format_table(result: dict[str, typing.Any]) -> str:
    """A plain-text table of the figures: one row per path (eager, fast, int8) and phase, then
    the notes (settings, compile cost, speed-ups, int8, demo-checkpoint accuracy, CPU peak,
    compile failures, memory method)."""
    m = result["machine"]
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m['threads']} threads)"
    lines = [f"{result['config']}  input {result['batch']}x3x{result['size'][0]}x{result['size'][1]}"
             f"  {result['gmacs']:.1f} GMACs/image  on {result['device']}: {where}, "
             f"torch {m['torch']}",
             f"{'path':<34} {'phase':<6} {'ms/batch':>9} {'cpu ms':>9} {'img/s':>8} "
             f"{'peak MB':>8} {'MFU' if 'cpu_peak' not in result else '% CPU peak wall/cpu':>19}"]
    lines += _table_rows(result) + _settings_notes(result) + _figure_notes(result)
    lines.append(f"memory: {result.get('memory_method', '')}")
    return "\n".join(lines)


def _table_row(name: str, phase: str, figures: dict, prefix: str, error: str | None) -> str:
    """One path's row: time, CPU time, images/s, peak memory, and its MFU (GPU) or share of
    the estimated peak of its arithmetic (CPU); or why it was not measured."""
    ms = figures.get(f"{prefix}step_ms" if prefix else "latency_ms")
    if ms is None:
        return f"{name:<34} {phase:<6} {error or 'not measured'}"
    mfu = figures.get(f"{prefix}mfu")
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "-"
    if figures.get(f"{prefix}peak_fraction") is not None:  # CPU: of its arithmetic's peak
        mfu_text = (f"{100 * figures[prefix + 'peak_fraction']:.1f}% / "
                    f"{100 * figures[prefix + 'cpu_peak_fraction']:.1f}% "
                    f"{figures[prefix + 'peak_arithmetic']}")
    return (f"{name:<34} {phase:<6} {ms:9.1f} {figures[prefix + 'cpu_ms']:9.1f} "
            f"{figures[prefix + 'images_per_s']:8.2f} "
            f"{figures[prefix + 'peak_memory_mb']:8.0f} {mfu_text:>19}")


def _table_rows(result: dict[str, typing.Any]) -> list[str]:
    """The rows of the phases measured: inference (eager, fast, int8), training (eager, fast)."""
    m, rows = result["machine"], []
    fast, errors = result.get("fast", {}), result.get("errors", {})
    eager = "eager fp32" + (" (TF32 convs)" if m.get("tf32_convolutions") else "")
    if result["mode"] in ("infer", "both"):
        rows.append(_table_row(eager, "infer", result, "", errors.get("infer")))
        if fast:
            rows.append(_table_row("fast (--fast)", "infer", fast, "", errors.get("fast_infer")))
        if "int8" in result or "int8_infer" in errors:
            rows.append(_table_row("int8 (PT2E, x86 inductor)", "infer", result.get("int8", {}),
                                   "", errors.get("int8_infer")))
    if result["mode"] in ("train", "both"):
        amp = (result.get("train_settings") or "fp32").split(",")[0].replace(" autocast", "")
        tf32 = " (TF32 convs)" if amp == "fp32" and m.get("tf32_convolutions") else ""
        rows.append(_table_row(f"eager {amp}{tf32} (batch {result['train_batch']})", "train",
                               result, "train_", errors.get("train")))
        if fast:
            rows.append(_table_row(f"fast (batch {result['train_batch']})", "train", fast,
                                   "train_", errors.get("fast_train")))
    return rows


def _settings_notes(result: dict[str, typing.Any]) -> list[str]:
    """What the paths ran: the fast inference settings, the compile rule and cost, the
    training steps' settings."""
    fast, lines = result.get("fast", {}), []
    if fast.get("settings"):
        lines.append(f"fast inference: {fast['settings']}")
    if fast.get("compile_rule"):
        lines.append(f"torch.compile rule: {fast['compile_rule']}")
    if fast.get("compile_s") is not None:
        even = fast.get("break_even_images")
        lines.append(f"fast compile: {fast['compile_s']:.1f} s (first call, not timed); "
                     + (f"paid back after {even:.0f} images at this size" if even is not None
                        else "never paid back (not faster)")
                     + ("; compiled ran slower than uncompiled: back to uncompiled"
                        if fast.get("compiled_slower") else ""))
    if result.get("train_settings"):
        lines.append(f"training step: {result['train_settings']}")
    if fast.get("train_settings"):
        lines.append(f"fast training: {fast['train_settings']}")
    if result.get("fast_gmacs") is not None:
        lines.append(f"late upsampling: the fast paths compute {result['fast_gmacs']:.1f} GMACs "
                     f"an image (training {result['fast_train_gmacs']:.1f}), the network "
                     f"{result['gmacs']:.1f} ({result['train_gmacs']:.1f}): their % of peak "
                     f"counts what they compute, MFU the network's")
    return lines


def _above_the_estimate(result: dict[str, typing.Any]) -> bool:
    """Whether any path's achieved FLOP/s exceeds the estimated peak (`hardware.cpu_peak`)."""
    sections = (result, result.get("fast", {}), result.get("int8", {}))
    return any((figures.get(key) or 0) > 1 for figures in sections for key in figures
               if key.endswith("peak_fraction"))


def _figure_notes(result: dict[str, typing.Any]) -> list[str]:
    """The speed-ups, the int8 costs, the demo-checkpoint accuracy, the CPU peak estimate and
    the compile failures."""
    fast, lines = result.get("fast", {}), []
    for label, phase, prefix, figures in (("fast", "inference", "", fast),
                                          ("fast", "training", "train_", fast),
                                          ("int8", "inference", "", result.get("int8", {}))):
        if f"{prefix}speedup" in figures:
            cpu = figures.get(f"{prefix}cpu_speedup")
            lines.append(f"{label} {phase} speed-up: {figures[prefix + 'speedup']:.2f}x wall"
                         + (f", {cpu:.2f}x CPU" if cpu is not None else "")
                         + f" (median of {len(figures[prefix + 'speedup_runs'])} interleaved "
                           f"eager/{label} rounds)")
    if result.get("int8", {}).get("quantize_s") is not None:
        int8 = result["int8"]
        lines.append(f"int8: {int8['settings']}; quantize {int8['quantize_s']:.1f} s, compile "
                     f"{int8['compile_s']:.1f} s")
    if result.get("demo_accuracy"):
        acc = result["demo_accuracy"]
        lines.append(f"accuracy on the demo checkpoint ({acc['images']}), vs fp32 eager:")
        for name, row in acc["paths"].items():
            lines.append(f"  {name:<11} argmax agreement {100 * row['agreement']:7.3f}%  "
                         f"mIoU {100 * row['miou']:6.2f} ({100 * row['miou_change']:+.2f} "
                         f"points)")
    if result.get("cpu_peak"):
        lines.append(result["cpu_peak"]["describe"] + "; an estimate"
                     + ("; a path above 100% means the cores ran faster than that clock (a turbo "
                        "clock the machine does not report)" if _above_the_estimate(result) else ""))
    for key in ("compile_error", "train_compile_error"):
        if fast.get(key):
            lines.append(f"torch.compile failed, measured uncompiled: {fast[key]}")
    return lines
