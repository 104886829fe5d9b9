"""BatchNorm folding and the fast inference path (`--fast`).

At inference a BatchNorm is a fixed per-channel affine map, y = gamma * (x - mean) / sqrt(var +
eps) + beta, so it can be folded into the convolution that feeds it:

    W' = W * s[:, None, None, None],   b' = (b - mean) * s + beta,   s = gamma / sqrt(var + eps).

Every convolution of UPerNet is followed by a BatchNorm except the two classifiers (backbone
stem and bottlenecks, the downsample shortcuts, the PPM branches and bottleneck, the FPN
laterals and convs, the fusion conv), so folding removes 70+ memory passes over the feature
maps without changing the function (up to float rounding; `tests/test_fast_path.py`).

`fast_inference_model` stacks the other inference speed-ups on top, each decided by measuring
on the device (figures in `docs/benchmarks.md`):

- channels_last (NHWC) memory format: oneDNN / cuDNN convolutions run natively in NHWC;
- autocast to bf16 (CUDA with bf16 support, or a CPU with native bf16 instructions: AVX512-BF16
  or AMX) or fp16 (older CUDA GPUs); logits are returned as float32;
- late upsampling (`late_upsampling.py`, CPU): the PPM bottleneck and the fusion conv mix their
  coarse inputs before upsampling them, the same function with 32% fewer MACs on R-50 os8 at
  512x512 (397.5 -> 272.0 GMACs); on the idle 2-core Zen 4 VM, `upernet bench` measured the
  compiled path at 1.92x fp32 eager before and 2.7x after, `train --fast` at 1.7-1.9x before
  and 2.3x after (docs/benchmarks.md). Not on CUDA until measured there;
- under bf16, a few cheap layers whose rounding costs the most argmax agreement stay float32
  (`Float32`, `BF16_FLOAT32_MODULES`: the stem, layer1-2 and the classifier), so that a trained
  model's argmax agrees with fp32 eager on >= 99.9% of the pixels of real images (`tests/test_fast_path.py`);
- `torch.compile` (`compile_rule`): on CUDA from the first call; on an x86 CPU with AVX2 or
  AVX-512 and a C++ compiler, through inductor's C++ backend with `freezing` (the folded weights
  become constants, converted to bf16 and prepacked for oneDNN once, and the elementwise layers
  fused into the convolutions), which took R-50 os8 512x512 from ~1.7x to 2.3-2.7x fp32 eager
  in CPU time on the 2-core Zen 5 VM (docs/benchmarks.md). On the CPU compiling costs tens of seconds per input
  shape, so it is amortised like renting before buying: a shape runs uncompiled until its calls
  have taken `compile_after_s` seconds (about one compile), and is compiled then; so a single
  image, or a few, never pay for it, and a long run pays at most about twice the best choice in
  hindsight. At most `MAX_COMPILED_SHAPES` shapes are compiled (sliding-window crops all have
  one), and a compiled shape that runs no faster than its uncompiled calls did goes back to them.
  Where compiling fails (no C compiler, no Triton) the model runs uncompiled from then on, with
  a warning, and `FastModel.compile_error` says why.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import typing
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from upernet_ref.perf.hardware import cpp_compiler, cpu_has_native_bf16
from upernet_ref.perf.late_upsampling import late_upsampling as late_upsampling_heads
from upernet_ref.training.runtime import autocast_to


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) computing `bn(conv(x))` for `bn` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_conv_bn: the BatchNorm has no running statistics to fold")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"fold_conv_bn: conv has {conv.out_channels} output channels, "
                         f"BatchNorm {bn.num_features}")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight.device)
    # Fold in float64 so that the folded layer is as close to conv -> BN as float32 allows.
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:  # affine BatchNorm (always, in this package)
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    fused.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_((bias * scale + shift).to(conv.weight.dtype))
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every conv -> BatchNorm pair folded into one conv.

    A pair is a `Conv2d` child immediately followed by a `BatchNorm2d` child of the same parent
    module, in registration order. That is how every such pair in this package is written
    (`ConvBNReLU.conv/bn`, `Bottleneck.convK/bnK`, the deep stem and downsample `Sequential`s),
    and the conv is the one feeding that BatchNorm; the BatchNorm becomes `nn.Identity`, so
    module names and the forward code are unchanged. The original model is not modified.
    """
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        children = list(parent.named_children())
        for (name, child), (next_name, next_child) in zip(children, children[1:]):
            if (isinstance(child, nn.Conv2d) and isinstance(next_child, nn.BatchNorm2d)
                    and child.out_channels == next_child.num_features):
                setattr(parent, name, fold_conv_bn(child, next_child))
                setattr(parent, next_name, nn.Identity())
    return model


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm layers left in `model` (0 after `fold_batchnorm` on UPerNet)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Which speed-ups to use where: the rules `--fast` follows (measured, see docs/benchmarks.md).

@dataclass(frozen=True)
class FastSettings:
    """The fast-path choices: autocast dtype (None = float32), channels_last, torch.compile, and
    the submodules (dotted names, e.g. "decode_head.classifier") kept in float32 under autocast.

    `freezing`: compile with inductor's freezing (inference only: weights as constants);
    `compile_after_s`: wall seconds of uncompiled calls of one input shape before that shape is
    compiled (0: compile on the first call); `train_compile`: torch.compile the training step (`train
    --fast`), decided apart from inference since a training step compiles and pays differently;
    `train_float32_logits`: the training step upsamples the two heads' logits in float32
    (`float32_logits`), under autocast only; `train_channels_last_inputs`: every conv of the
    training step gets a channels_last input (`channels_last_conv_inputs`), with channels_last
    only. Both are applied by `fast_training_model`. `late_upsampling`: the head's two fusion
    convs mix their coarse inputs before upsampling them (`late_upsampling.late_upsampling`:
    the same function with 32% fewer MACs on R-50 os8), at inference and in training.
    """

    dtype: torch.dtype | None
    channels_last: bool = True
    compile: bool = False
    float32_modules: tuple[str, ...] = ()
    freezing: bool = False
    compile_after_s: float = 0.0
    train_compile: bool | None = None  # None: as `compile`
    train_float32_logits: bool = False
    train_channels_last_inputs: bool = False
    late_upsampling: bool = False

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "float32"
        keep = (f", float32: {'+'.join(self.float32_modules)}"
                if self.dtype is not None and self.float32_modules else "")
        keep += ", late upsampling" if self.late_upsampling else ""
        compiled = ""
        if self.compile:
            compiled = ", torch.compile" + (" with freezing" if self.freezing else "")
            if self.compile_after_s:
                compiled += f" (a shape after {self.compile_after_s:g} s of uncompiled calls)"
        return (f"BN folded, {dtype}{keep}, {'channels_last' if self.channels_last else 'NCHW'}"
                f"{compiled}")

    def train_overrides(self) -> dict[str, typing.Any]:
        """These choices as configuration overrides of the training step (`upernet train
        --fast`, the fast rows of `upernet bench`): autocast, channels_last, torch.compile.
        BN folding and the float32 modules are inference-only."""
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "none"}[self.dtype]
        compile = self.compile if self.train_compile is None else self.train_compile
        return {"train.amp": amp, "train.channels_last": self.channels_last,
                "train.compile": compile}


def _to_float(x: typing.Any) -> typing.Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


class Float32(nn.Module):
    """Runs `module` in float32 inside an autocast region: floating inputs cast up, autocast off.

    Its outputs stay float32; the next autocast op casts them down again where it wants to.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: typing.Any) -> typing.Any:
        flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        device_type = next((a.device.type for a in flat if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type, enabled=False):
            return self.module(*_to_float(args))


def keep_float32(model: nn.Module, names: typing.Iterable[str]) -> nn.Module:
    """Wrap the submodules `names` of `model` (in place) in `Float32`.

    Unknown names raise a ValueError. A `ModuleList` (e.g.
    "decode_head.lateral_convs") has each of its members wrapped, since the forward code
    iterates over it.
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            module = parent.get_submodule(child)
        except AttributeError as e:
            raise ValueError(f"keep_float32: the model has no submodule {name!r}") from e
        if isinstance(module, nn.ModuleList):
            for i, member in enumerate(module):
                module[i] = Float32(member)
        else:
            setattr(parent, child, Float32(module))
    return model


# Kept in float32 under bf16 autocast (UPerNet names; "backbone.conv1" is the plain stem). The
# rounding of the early layers (the normalized image itself, then C2/C3) is amplified by the 40+
# layers after them, and bf16 logits (8-bit mantissa) create ties; these layers are ~3% of the
# MACs of R-50 os8 at 512x512. Measured: R-50 os8 512x512 1.97x -> 1.82x the images/s of fp32
# eager, argmax agreement of a trained model on real images 99.85% -> 99.92% (docs/benchmarks.md).
BF16_FLOAT32_MODULES = ("backbone.stem", "backbone.conv1", "backbone.layer1", "backbone.layer2",
                        "decode_head.classifier")


def cuda_autocast_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bf16 on GPUs with bf16 tensor cores (compute capability 8.0+: Ampere, Hopper, ...), else
    fp16 (Volta, Turing). `torch.cuda.is_bf16_supported()` is not the test: by default it also
    says True where bf16 is only emulated (e.g. V100, T4), which is slower than fp16."""
    return torch.bfloat16 if capability[0] >= 8 else torch.float16


def compile_rule(device: str | torch.device) -> tuple[bool, str]:
    """Whether `--fast` compiles inference on `device`, and why (printed by `upernet bench`).

    CUDA: yes (Triton kernels; uncompiled with a warning where they cannot be built). CPU: yes
    on x86 with AVX2 or AVX-512 (torch's CPU capability) when a C++ compiler is on PATH, the
    two things inductor's C++ backend needs; measured at 2.3-2.7x fp32 eager (CPU time) with
    freezing against 1.7x for the same model uncompiled (R-50 os8 512x512, Zen 5, 2 cores;
    docs/benchmarks.md). Elsewhere (ARM, no compiler): no, today's uncompiled path.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True, "CUDA: torch.compile (Triton)"
    if device.type != "cpu":
        return False, f"{device.type}: not measured, uncompiled"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX2", "AVX512")):
        return False, f"CPU capability {capability}: inductor's x86 C++ path not measured here"
    compiler = cpp_compiler()
    if compiler is None:
        return False, "no C++ compiler on PATH (g++/c++/clang++): inductor cannot build kernels"
    return True, (f"CPU {capability} + C++ compiler {compiler}: inductor C++ backend with "
                  f"freezing; a shape is compiled after {CPU_COMPILE_AFTER_S:g} s of uncompiled "
                  f"calls (about one compile)")


# Uncompiled seconds of one input shape before the CPU fast path compiles it: about what one
# compile costs (R-50 os8 512x512 on 2 cores: 14-27 s measured, more under load), so the compile
# is bought once its rent is paid: a few images never pay it, a long evaluation pays at most
# about twice the best choice. At most MAX_COMPILED_SHAPES shapes are compiled (whole-image
# evaluation of images of many sizes would otherwise compile again and again).
CPU_COMPILE_AFTER_S = 30.0
MAX_COMPILED_SHAPES = 4


def default_fast_settings(device: str | torch.device) -> FastSettings:
    """The fastest combination measured for a device type that keeps the argmax (>= 99.9% of
    the pixels of fp32 eager, `tests/test_fast_path.py`).

    CUDA: bf16 where the GPU has bf16 tensor cores (Ampere and later) else fp16
    (`cuda_autocast_dtype`), channels_last, torch.compile.
    CPU: bf16 only with native bf16 instructions (on CPUs without them bf16 is emulated and
    slower than float32), channels_last, torch.compile with freezing where `compile_rule`
    allows, amortised (`CPU_COMPILE_AFTER_S`), late upsampling (inference and training;
    not yet on CUDA, where it is not measured). The training step (`train --fast`) is not
    compiled on the CPU: compiled it was slower than eager bf16 (docs/benchmarks.md); it
    upsamples the logits in float32 and gives every conv a channels_last input
    (`fast_training_model`). With bf16, the stem, layer1-2 and
    the classifier stay float32 at inference (`BF16_FLOAT32_MODULES`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        dtype = cuda_autocast_dtype(torch.cuda.get_device_capability(device))
        keep = BF16_FLOAT32_MODULES if dtype == torch.bfloat16 else ()
        return FastSettings(dtype=dtype, channels_last=True, compile=True, float32_modules=keep)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    compile = compile_rule(device)[0]
    return FastSettings(dtype=dtype, channels_last=True, compile=compile,
                        float32_modules=BF16_FLOAT32_MODULES if dtype is not None else (),
                        freezing=compile, compile_after_s=CPU_COMPILE_AFTER_S if compile else 0.0,
                        train_compile=False, train_float32_logits=True,
                        train_channels_last_inputs=True, late_upsampling=True)


# The heads' last layers: their outputs are the 1/4- and 1/8-resolution logits that UPerNet.forward
# upsamples to the image size for the loss.
CLASSIFIERS = ("decode_head.classifier", "aux_head.classifier")


def _float32_nchw(module: nn.Module, args: typing.Any, output: torch.Tensor) -> torch.Tensor:
    return output.float().contiguous()


def float32_logits(model: nn.Module) -> nn.Module:
    """Make the classifiers of `model` (`CLASSIFIERS`, in place) return float32 NCHW logits, so
    that under autocast the bilinear upsampling to the image size and the cross-entropy run on
    float32 NCHW tensors (`train --fast` on the CPU, `FastSettings.train_float32_logits`).

    Why: the loss casts the logits to float32 anyway (`losses.cross_entropy`), but after the
    upsampling, i.e. on the full-size (B, 150, 512, 512) tensor: a bf16 channels_last upsampled
    copy, its float32 copy, log-softmax converting channels_last to NCHW, and the same casts and
    conversions backwards, all memory passes over 2 x 79 M values for each head. Cast at 1/4
    (1/8) resolution, 16x (64x) fewer values are cast, and the upsampling is done in float32 as
    in fp32 eager instead of being rounded to bf16 (closer to the reference, not further). The
    classifiers themselves still run under autocast. A forward hook, so module names and the
    state dict are unchanged (checkpoints load either way); a no-op on float32 NCHW logits.
    Measured on R-50 os8 512x512, batch 2 (Zen 4): docs/benchmarks.md.
    """
    for name in CLASSIFIERS:
        if not _has_submodule(model, name):
            continue  # no auxiliary head
        module = model.get_submodule(name)
        if not getattr(module, "_float32_logits", False):
            module.register_forward_hook(_float32_nchw)
            module._float32_logits = True
    return model


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def channels_last_conv_inputs(model: nn.Module) -> nn.Module:
    """Give every Conv2d of `model` (in place) a channels_last input: a forward pre-hook that
    converts an NCHW input and leaves a channels_last one alone (`train --fast` on the CPU, with
    `float32_logits`; the state dict is unchanged).

    Why: in a channels_last model one input is still NCHW, the PPM's concatenation (its 1x1
    pooled branch, upsampled from a (B, 512, 1, 1) map whose layout is ambiguous, comes out
    NCHW, and so does the `torch.cat`), and it feeds the PPM bottleneck, a 4096 -> 512 3x3
    conv (10% of the MACs of R-50 os8), which oneDNN then runs 10% slower in bf16 forward and
    backward (2 x 4096 x 64 x 64, Zen 5: 6.2 s -> 5.6 s CPU time). Values are unchanged.
    (With late upsampling the PPM bottleneck and the fusion conv call `F.conv2d` themselves,
    without their modules' hooks, on inputs they make channels_last.)
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and not getattr(module, "_channels_last_input", False):
            module.register_forward_pre_hook(_channels_last_input)
            module._channels_last_input = True
    return model


def error_summary(err: BaseException) -> str:
    """`TypeName: first line of the message`, for logs and JSON."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def freezing(enabled: bool = True) -> typing.ContextManager:
    """Inductor's `freezing` for the compiles started inside (set globally while they run:
    passed as `torch.compile(options=...)` it does not reach the pass that folds the int8
    weight prepacking, which then fails with UnsupportedOperatorException:
    onednn.qconv_prepack)."""
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True) if enabled else contextlib.nullcontext()


class FastModel(nn.Module):
    """The folded model behind autocast and channels_last; same `{"out": float32 logits}` API.

    With `settings.compile`, an input shape runs compiled once its uncompiled calls have taken
    `compile_after_s` seconds (at most `MAX_COMPILED_SHAPES` shapes; the others stay
    uncompiled). `compile_s` is the wall time of the compiling calls. On the CPU, a compiled
    shape whose two calls after compiling both take more process CPU time than its fastest
    uncompiled call goes back to uncompiled calls (`slower_shapes`).
    A call whose compiled run raises is re-run uncompiled; if that succeeds the failure was
    torch.compile's (no Triton, no C compiler, ...): the model stays uncompiled from then on,
    `settings.compile` becomes False and `compile_error` says why. CUDA out-of-memory is raised
    as it is; any other error of the model itself (a bad input) is raised by the uncompiled run.
    """

    def __init__(self, model: nn.Module, settings: FastSettings, device: torch.device):
        super().__init__()
        self.model = model
        self.settings = settings
        self.device = device
        self.forward_fn = torch.compile(model, dynamic=False) if settings.compile else model
        self.compile_error: str | None = None
        self.compile_s = 0.0
        self.uncompiled_s: dict[tuple[int, ...], float] = {}  # wall seconds per shape
        self.compiled_shapes: list[tuple[int, ...]] = []
        self.slower_shapes: list[tuple[int, ...]] = []
        self._uncompiled_cpu_s: dict[tuple[int, ...], float] = {}  # fastest call, CPU s
        self._compiled_cpu_s: dict[tuple[int, ...], list[float]] = {}

    def _run(self, fn: typing.Callable, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast_to(self.device, self.settings.dtype):
            out = fn(images)
        return {k: v.float().contiguous() for k, v in out.items()}

    def _use_compiled(self, shape: tuple[int, ...]) -> bool:
        if self.forward_fn is self.model or shape in self.slower_shapes:
            return False
        return shape in self.compiled_shapes or (
            self.uncompiled_s.get(shape, 0.0) >= self.settings.compile_after_s
            and len(self.compiled_shapes) < MAX_COMPILED_SHAPES)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device)
        if self.settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        shape = tuple(images.shape)
        if not self._use_compiled(shape):
            wall, cpu = time.perf_counter(), time.process_time()
            out = self._run(self.model, images)
            cpu = time.process_time() - cpu
            self.uncompiled_s[shape] = self.uncompiled_s.get(shape, 0.0) + (
                time.perf_counter() - wall)
            self._uncompiled_cpu_s[shape] = min(cpu, self._uncompiled_cpu_s.get(shape, cpu))
            return out
        compiling = shape not in self.compiled_shapes
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            with freezing(self.settings.freezing and compiling):
                out = self._run(self.forward_fn, images)
        except torch.cuda.OutOfMemoryError:
            raise  # a figure (does not fit), not a compile failure
        except Exception as err:  # noqa: BLE001 - decided below by the uncompiled run
            failure = error_summary(err)
        else:
            cpu = time.process_time() - cpu
            if compiling:
                self.compiled_shapes.append(shape)
                self.compile_s += time.perf_counter() - wall
            elif self.device.type == "cpu" and shape in self._uncompiled_cpu_s:
                self._check_slower(shape, cpu)
            return out
        # outside the except block, so that the failed run's tensors are already freed
        out = self._run(self.model, images)
        self.forward_fn, self.compile_error = self.model, failure
        self.settings = dataclasses.replace(self.settings, compile=False)
        warnings.warn(f"fast path: torch.compile failed ({failure}); running uncompiled",
                      RuntimeWarning, stacklevel=2)
        return out

    def _check_slower(self, shape: tuple[int, ...], cpu: float) -> None:
        """After the two calls that follow the compile (the first after it can still be slow):
        back to uncompiled when both took more CPU time than the fastest uncompiled call."""
        times = self._compiled_cpu_s.setdefault(shape, [])
        if len(times) < 2:
            times.append(cpu)
            if len(times) == 2 and min(times) >= self._uncompiled_cpu_s[shape]:
                self.slower_shapes.append(shape)


def fast_inference_model(model: nn.Module, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None | str = "auto",
                         channels_last: bool | None = None,
                         compile: bool | None = None,
                         float32_modules: typing.Iterable[str] | None = None,
                         compile_after_s: float | None = None,
                         late_upsampling: bool | None = None) -> FastModel:
    """The fast inference version of `model` (which is left untouched).

    BatchNorm folded into the convolutions (`fold_batchnorm`), eval mode, moved to `device`,
    then channels_last, autocast and `torch.compile` as `default_fast_settings(device)` decides
    unless given: `dtype` "auto" | None (float32) | torch.bfloat16 | torch.float16;
    `float32_modules`: dotted submodule names run in float32 under autocast (`keep_float32`;
    default: those of `BF16_FLOAT32_MODULES` the model has when the dtype is bf16, else none);
    `compile_after_s`: uncompiled seconds of a shape before it is compiled (default: the
    device's; 0: compile on the first call); `late_upsampling`: the head's fusion convs computed
    by `late_upsampling.late_upsampling` (default: the device's).
    Call it like the model: `fast(images)["out"]` are float32 logits at the input resolution.
    """
    device = torch.device(device)
    defaults = default_fast_settings(device)
    if isinstance(dtype, str):
        if dtype != "auto":
            raise ValueError(f"fast_inference_model: dtype must be 'auto', None or a torch "
                             f"dtype, got {dtype!r}")
        dtype = defaults.dtype
    folded = fold_batchnorm(model).to(device)
    if float32_modules is None:  # the bf16 rule names UPerNet modules: keep those the model has
        float32_modules = [name for name in BF16_FLOAT32_MODULES
                           if dtype == torch.bfloat16 and _has_submodule(folded, name)]
    compile = defaults.compile if compile is None else compile
    settings = FastSettings(
        dtype=dtype,
        channels_last=defaults.channels_last if channels_last is None else channels_last,
        compile=compile,
        float32_modules=tuple(float32_modules),
        freezing=compile and device.type == "cpu",
        compile_after_s=(defaults.compile_after_s if compile_after_s is None else compile_after_s)
        if compile else 0.0,
        late_upsampling=defaults.late_upsampling if late_upsampling is None else late_upsampling,
    )
    if settings.dtype is not None:
        keep_float32(folded, settings.float32_modules)
    if settings.late_upsampling:
        late_upsampling_heads(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    if settings.channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return FastModel(folded, settings, device).eval()


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def fast_training_model(model: nn.Module, settings: FastSettings, amp: str,
                        channels_last: bool) -> tuple[nn.Module, list[str]]:
    """`model` (in place) with the training-step choices of `settings` that are not
    configuration values: `late_upsampling` (the heads' modules get the late-upsampling
    subclasses), `float32_logits` under autocast (`amp` not "none") and
    `channels_last_conv_inputs` with `channels_last`, as `train.amp` / `train.channels_last`
    finally say (explicit overrides win over `--fast`). A class change and forward hooks: the
    parameters, the state dict, the checkpoints and fp32 eager are unchanged. Returns the model
    and what was applied, in words."""
    applied = []
    if settings.late_upsampling:
        late_upsampling_heads(model)
        applied.append("late upsampling")
    if settings.train_float32_logits and amp != "none":
        float32_logits(model)
        applied.append("logits upsampled in float32")
    if settings.train_channels_last_inputs and channels_last:
        channels_last_conv_inputs(model)
        applied.append("channels_last conv inputs")
    return model, applied
