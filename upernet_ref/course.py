"""What the notebooks (`notebooks/`, the course) need from the package, in one place.

- `check_*(answer)`: each exercise's checker. A student writes a function in a notebook cell;
  the checker runs it on seeded random cases plus the edge cases against a private reference
  written here (`_ref_*`, tested against the package in `tests/test_course.py`), with the package
  functions the exercise asks for blocked (`blocked`: a call fails with "write it yourself"), and
  either prints what passed or raises `ExerciseError` saying, in one line, what is wrong: the
  known mistake the answer matches, or the type, shape, dtype, values (NaN included) that differ,
  or the exception the answer raised and on which case. "Checking an answer" below says how.
- `pick_device()`, `full_size(device)` and `exact_comparisons()`: the same cells on a CPU and on
  a GPU. On a GPU (or with `UPERNET_COURSE_FULL_SIZE=1` on any machine) notebooks 01-03 compare
  at the published widths; their printed output is the same either way. cuDNN and cuBLAS use
  TF32 for float32 convolutions and matrix products on Ampere and later GPUs (10-bit mantissa),
  which makes a hand-built network differ from the package's by ~1e-3, far above
  `assert_close`'s float32 tolerances; comparisons therefore switch TF32 off.
- `output_shapes(model, x, names)`, `draw_diagram(ax, boxes, arrows)` and `class_legend(fig,
  names, palette)`: the pictures, drawn from the model itself (shapes recorded by forward hooks,
  on the `meta` device), and the class-colour legend of every mask figure.
- `randomize_batchnorm(model)`: non-trivial BatchNorm statistics, so that a comparison of two
  networks cannot pass with a BatchNorm wired wrongly (also the tests' tool).
- `load_demo_checkpoint(model)`: the course's trained `upernet_small_demo` weights
  (`upernet_ref/assets/upernet_small_demo.safetensors`, made by
  `notebooks/assets/make_demo_checkpoint.py`), verified by SHA-256 before loading; safetensors
  holds only tensors, so loading it cannot run code. Loading is strict (every name and shape),
  which is what the capstone (notebook 10) relies on.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import math
import random
import traceback
import typing
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"  # package data: there after any install
DEMO_CHECKPOINT = ASSETS / "upernet_small_demo.safetensors"
DEMO_CHECKPOINT_SHA256 = "d82da1e51840648dccb532a7e3a764beb124862c4f99f57d8f915a28717e8b39"


class ExerciseError(AssertionError):
    """An exercise's answer differs from the reference; the message says how."""


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    A fresh BatchNorm (mean 0, variance 1, weight 1, bias 0) is the identity in eval mode, so a
    comparison of two implementations, or of a model with its BN-folded copy, could pass with the
    BN wired wrongly. After this every BN is a non-trivial affine map. Returns `model`.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.uniform_(0.5, 1.5, generator=generator)
            m.bias.uniform_(-0.2, 0.2, generator=generator)
    return model


# --------------------------------------------------------------------------------------------
# The same cells on a CPU and a GPU

def pick_device() -> torch.device:
    """CUDA when there is a GPU, the CPU otherwise (every notebook's first cell; the trainer's rule)."""
    from upernet_ref.launch import resolve_device

    return resolve_device("auto")


FULL_SIZE_VARIABLE = "UPERNET_COURSE_FULL_SIZE"


def full_size(device: torch.device) -> bool:
    """Whether a notebook runs its comparisons at the published sizes (widths and depths).

    True on a GPU, and on any machine when the environment variable `UPERNET_COURSE_FULL_SIZE`
    is `1`: that is how the GPU branch of notebooks 01-03 is tested on a CPU
    (`tests/test_notebook_full_size.py`). Their printed output is the same in both branches.
    """
    import os

    return device.type == "cuda" or os.environ.get(FULL_SIZE_VARIABLE, "") == "1"


def exact_comparisons() -> None:
    """Switch off TF32 so float32 comparisons against the package hold on Ampere+ GPUs too."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


# --------------------------------------------------------------------------------------------
# Pictures drawn from the model itself

def output_shapes(model: nn.Module, x: torch.Tensor, names: typing.Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The output shape of each named submodule in one forward pass of `model` on `x`.

    Run it on the `meta` device to get the full-size shapes for free (no memory, no compute).
    The forward pass is in eval mode (the model's mode is restored after).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(module, inputs, output):
            out = output["out"] if isinstance(output, dict) else output
            shapes[name] = tuple(out[-1].shape) if isinstance(out, (list, tuple)) else tuple(out.shape)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def draw_diagram(ax, boxes: dict[str, tuple[float, float, str]], arrows: typing.Sequence[tuple[str, str]],
                 colors: dict[str, str] | None = None) -> None:
    """Boxes `{key: (x, y, text)}` (centres, in data units) joined by `arrows` (from, to)."""
    colors = colors or {}
    xs = [b[0] for b in boxes.values()]
    ys = [b[1] for b in boxes.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.axis("off")
    texts = {key: ax.text(x, y, text, ha="center", va="center", fontsize=7.5, zorder=3,
                          bbox={"boxstyle": "round,pad=0.35", "fc": colors.get(key, "#e8eef7"), "ec": "#445"})
             for key, (x, y, text) in boxes.items()}
    renderer = ax.figure.canvas.get_renderer()
    to_data = ax.transData.inverted()
    half = {}  # each box's half width and height in data units, from its drawn extent
    for key, t in texts.items():
        t.draw(renderer)
        (x0, y0), (x1, y1) = to_data.transform(t.get_bbox_patch().get_window_extent(renderer).get_points())
        half[key] = ((x1 - x0) / 2, (y1 - y0) / 2)

    def edge(key: str, dx: float, dy: float) -> tuple[float, float]:
        # where the ray from the box centre along (dx, dy) leaves the box
        hw, hh = half[key]
        t = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"))
        return boxes[key][0] + t * dx, boxes[key][1] + t * dy

    for a, b in arrows:
        dx, dy = boxes[b][0] - boxes[a][0], boxes[b][1] - boxes[a][1]
        ax.annotate("", xy=edge(b, -dx, -dy), xytext=edge(a, dx, dy), zorder=1,
                    arrowprops={"arrowstyle": "-|>", "color": "#555", "shrinkA": 1, "shrinkB": 1})


def class_legend(fig, names: typing.Sequence[str], palette: typing.Sequence[typing.Sequence[int]],
                 ignored: bool = True, **kwargs):
    """A legend under `fig` naming each class colour of its mask panels (and 255 = ignored).

    Every mask figure of the course carries one: without it a reader cannot tell which class the
    model painted where.
    """
    from matplotlib.patches import Patch

    from upernet_ref.data.transforms import IGNORE_COLOR

    handles = [Patch(facecolor=[c / 255 for c in color], edgecolor="0.4", label=name)
               for name, color in zip(names, palette)]
    if ignored:
        handles.append(Patch(facecolor=[c / 255 for c in IGNORE_COLOR], edgecolor="0.4", label="255 (ignored)"))
    options = {"loc": "lower center", "ncol": min(len(handles), 9), "fontsize": 8, "frameon": False,
               "bbox_to_anchor": (0.5, -0.06)}
    return fig.legend(handles=handles, **{**options, **kwargs})


# --------------------------------------------------------------------------------------------
# The payoff checkpoint

def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_demo_checkpoint(model: nn.Module, path: str | Path = DEMO_CHECKPOINT,
                         expected_sha256: str = DEMO_CHECKPOINT_SHA256) -> nn.Module:
    """Load the course's trained `upernet_small_demo` weights into `model`, hash checked.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: its SHA-256 is not `expected_sha256` (a changed or damaged file).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (make it with "
                                f"notebooks/assets/make_demo_checkpoint.py)")
    actual = sha256(path)
    if actual != expected_sha256:
        raise ValueError(f"{path}: SHA-256 {actual} is not the expected {expected_sha256}")
    model.load_state_dict(load_file(str(path)))
    return model


# --------------------------------------------------------------------------------------------
# Checking an answer: how every checker below works
#
# - The expected values come from a private reference written here (`_ref_*`), never from the
#   package function the exercise asks for; `tests/test_course.py` checks each reference against
#   the package, so the package stays the one implementation and the checker an independent one.
# - While the answer runs, the package functions it asks for are blocked (their code is swapped
#   for one that raises `WriteItYourself`), however the notebook imported them.
# - Each check draws several cases from a seeded generator (the same on every run, so a notebook's
#   output is stable) and adds the edge cases where the usual mistakes show.
# - When an answer is wrong, the checker computes the known wrong variants on the failing case and
#   names the mistake whose output the answer matches; otherwise it says what differs.
# - An exception in the answer is reported in a few lines as the case that caused it, with the
#   answer's own line; the checker's frames are hidden from IPython's traceback
#   (`__tracebackhide__`) and the chained traceback is dropped.

class WriteItYourself(ExerciseError):
    """The answer called the package function the exercise asks the student to write."""


def _fail(message: str) -> typing.NoReturn:
    raise ExerciseError(message) from None  # the one frame of the checker a failed check shows


def _write_it_yourself(*args, **kwargs):
    # the code that a blocked package function runs while an answer is checked
    import sys

    frame = sys._getframe(0)
    raise sys.modules["upernet_ref.course"].WriteItYourself(
        f"write it yourself: your answer called {frame.f_globals['__name__']}."
        f"{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}, "
        f"{'the package' if frame.f_globals['__name__'].startswith('upernet_ref') else 'torch'}'s version of what "
        f"this exercise asks you to write (it is blocked while your answer runs)")


@contextlib.contextmanager
def blocked(*functions: typing.Callable) -> typing.Iterator[None]:
    """While inside, each of `functions` (plain functions or methods) raises `WriteItYourself`.

    The function object's code is swapped, so a name imported with `from ... import` is blocked
    too; the original code is restored on exit.
    """
    saved = []
    try:
        for f in functions:
            f = inspect.unwrap(f)
            names = {"co_name": f.__code__.co_name}
            if hasattr(f.__code__, "co_qualname"):  # Python 3.11+
                names["co_qualname"] = f.__code__.co_qualname
            stub = _write_it_yourself.__code__.replace(**names)
            saved.append((f, f.__code__))
            f.__code__ = stub
        yield
    finally:
        for f, code in saved:
            f.__code__ = code


def _answer_line(error: BaseException) -> str:
    """' (line N of f: `code`)': where in the answer (not in this module) `error` was raised."""
    frames = [fr for fr in traceback.extract_tb(error.__traceback__)
              if Path(fr.filename).resolve() != Path(__file__).resolve()]
    if not frames:
        return ""
    last = frames[-1]
    code = f": `{last.line.strip()}`" if last.line else ""
    return f" (line {last.lineno} of {last.name}{code})"


def _run(name: str, answer: typing.Callable, args: tuple, case: str,
         block: typing.Sequence[typing.Callable] = (), hints: typing.Sequence[tuple[str, str]] = ()):
    """`answer(*args)` with `block` blocked; an exception is reported as the case that caused it.

    `hints`: (text found in the exception's message, what it usually means).
    """
    __tracebackhide__ = True
    try:
        with blocked(*block):
            return answer(*args)
    except (NotImplementedError, ExerciseError):
        raise
    except Exception as error:  # the answer's own bug: say which case, in one message
        text = f"{type(error).__name__}: {error}".split("\n")[0][:300]
        hint = next((f"; {meaning}" for found, meaning in hints if found in text), "")
        _fail(f"{name} raised {text} for {case}{_answer_line(error)}{hint}")


def _describe(x: typing.Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in x):
        return f"a {type(x).__name__} of {len(x)}: " + ", ".join(_describe(v) for v in x[:4])
    return " ".join(f"{type(x).__name__} {x!r}".split())[:80]


def _as_tensor(x: typing.Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double()
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    if isinstance(x, (tuple, list)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        return torch.tensor([float(v) for v in x], dtype=torch.float64)
    return None


def _matches(got: typing.Any, expected: typing.Any, rtol: float, atol: float) -> bool:
    """Same shape and values within tolerance (NaN matches NaN), tensors, numbers or tuples."""
    g, e = _as_tensor(got), _as_tensor(expected)
    if g is None or e is None or g.shape != e.shape:
        return False
    return bool(torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True).all())


def compare(name: str, got: typing.Any, expected: typing.Any, case: str = "",
            rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Raise `ExerciseError` saying how `got` differs from `expected` (tensors or numbers).

    NaN is compared as a value: a NaN where a number is expected, or a number where NaN is
    expected, is named as such (never a 'largest difference nan').
    """
    __tracebackhide__ = True
    where = f" for {case}" if case else ""
    if isinstance(expected, tuple):
        if tuple(got) != expected if isinstance(got, (tuple, list)) else True:
            _fail(f"{name}: {got!r}{where}, expected {expected!r}")
        return
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            _fail(f"{name}: expected {_describe(expected)}{where}, got {_describe(got)}")
        if tuple(got.shape) != tuple(expected.shape):
            _fail(f"{name}: shape {tuple(got.shape)}{where}, expected {tuple(expected.shape)}")
        if got.dtype.is_floating_point != expected.dtype.is_floating_point:
            _fail(f"{name}: dtype {got.dtype}{where}, expected {expected.dtype}")
    elif not isinstance(got, (int, float)) or isinstance(got, bool):
        _fail(f"{name}: expected a number{where}, got {_describe(got)}")
    g, e = _as_tensor(got), _as_tensor(expected)
    nan_g, nan_e = torch.isnan(g), torch.isnan(e)
    for bad, what in ((nan_g & ~nan_e, "NaN"), (~nan_g & nan_e, "a number")):
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0]) if g.dim() else ()
            at = f" at index {index}" if index else ""
            _fail(f"{name}: {what}{at}{where} ({g[index].item():.6g}), expected "
                  f"{e[index].item():.6g}")
    bad = ~torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        both = ~nan_g & ~nan_e
        largest = (g - e).abs()[both].max().item()
        if g.dim() == 0:
            _fail(f"{name}: {got!r}{where}, expected {expected!r}")
        index = tuple(int(i) for i in bad.nonzero()[0])
        _fail(f"{name}: {int(bad.sum())} of {bad.numel()} values differ{where}; first at index "
              f"{index}: {g[index].item():.6g} instead of {e[index].item():.6g} "
              f"(largest difference {largest:.3g})")


def _check(name: str, got: typing.Any, expected: typing.Any, case: str,
           mistakes: typing.Iterable[tuple[str, typing.Callable[[], typing.Any]]] = (),
           rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Pass if `got` matches `expected`; else name the first mistake whose wrong output it matches."""
    __tracebackhide__ = True
    if _matches(got, expected, rtol, atol):
        return
    for message, wrong in mistakes:
        try:
            value = wrong()
        except Exception:  # a wrong variant that cannot even run on this case is not the answer
            continue
        if not _matches(value, expected, rtol, atol) and _matches(got, value, rtol, atol):
            _fail(f"{name}: {message} (for {case})")
    compare(name, got, expected, case, rtol, atol)


def _passed(name: str, cases: int) -> None:
    print(f"{name}: correct ({cases} case{'s' if cases > 1 else ''} checked, edge cases included)")


def _resize(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


# --------------------------------------------------------------------------------------------
# The exercises, one checker each (notebook number in the docstring)

def check_conv_output_size(answer: typing.Callable[..., int]) -> None:
    """01: `answer(size, kernel, stride, padding, dilation)` = a conv's output length."""
    __tracebackhide__ = True
    rng = random.Random(1)
    cases = [(64, 3, 1, 1, 1), (64, 3, 2, 1, 1), (65, 3, 2, 1, 1), (33, 3, 1, 4, 4), (10, 1, 2, 0, 1),
             (64, 3, 1, 1, 2), (7, 7, 2, 3, 1), (9, 3, 3, 0, 2)]
    while len(cases) < 20:
        case = (rng.randint(1, 80), rng.choice((1, 3, 5, 7)), rng.randint(1, 3), rng.randint(0, 4),
                rng.randint(1, 4))
        size, kernel, _, padding, dilation = case
        if size + 2 * padding >= dilation * (kernel - 1) + 1:
            cases.append(case)
    for size, kernel, stride, padding, dilation in cases:
        conv = nn.Conv2d(1, 1, kernel, stride, padding, dilation)  # the reference: torch itself
        expected = conv(torch.zeros(1, 1, size, size)).shape[-1]
        case = f"size={size}, kernel={kernel}, stride={stride}, padding={padding}, dilation={dilation}"
        got = _run("conv_output_size", answer, (size, kernel, stride, padding, dilation), case)
        if not isinstance(got, int) or isinstance(got, bool):
            _fail(f"conv_output_size: expected an int for {case}, got {_describe(got)} (use //)")
        _check("conv_output_size", got, expected, case, [
            ("the dilation is missing: a k-tap kernel with dilation d spans d (k - 1) + 1 pixels",
             lambda: (size + 2 * padding - kernel) // stride + 1),
            ("rounded up instead of down: a window that does not fit is dropped (use //)",
             lambda: -(-(size + 2 * padding - dilation * (kernel - 1) - 1) // stride) + 1),
            ("the padding is added on one side only (it pads both)",
             lambda: (size + padding - dilation * (kernel - 1) - 1) // stride + 1)], 0, 0)
    _passed("conv_output_size", len(cases))


def _ref_conv_bn_relu(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str,
                      padding: int = 0) -> torch.Tensor:
    y = F.conv2d(x, state[f"{prefix}conv.weight"], padding=padding)
    y = F.batch_norm(y, state[f"{prefix}bn.running_mean"], state[f"{prefix}bn.running_var"],
                     state[f"{prefix}bn.weight"], state[f"{prefix}bn.bias"], False, 0.0, 1e-5)
    return y.clamp(min=0)


def _ref_ppm(x: torch.Tensor, state: dict[str, torch.Tensor], scales: typing.Sequence[int],
             align_corners: bool = False, with_input: bool = True, pool=F.adaptive_avg_pool2d,
             conv_after_upsampling: bool = False) -> torch.Tensor:
    """PSPNet's pyramid pooling on `x` with the weights in `state` (eval mode), and its mistakes."""
    outs = [x] if with_input else []
    for k, s in enumerate(scales):
        pooled = pool(x, s)
        if conv_after_upsampling:
            outs.append(_ref_conv_bn_relu(_resize(pooled, x.shape[-2:], align_corners), state, f"branches.{k}."))
        else:
            outs.append(_resize(_ref_conv_bn_relu(pooled, state, f"branches.{k}."), x.shape[-2:], align_corners))
    return _ref_conv_bn_relu(torch.cat(outs, 1), state, "bottleneck.", padding=1)


def check_ppm(answer: typing.Callable[[torch.Tensor, nn.Module], torch.Tensor]) -> None:
    """02: `answer(x, ppm)` = `ppm(x)`, written with the PPM's own layers."""
    __tracebackhide__ = True
    from upernet_ref.model.ppm import PyramidPooling
    from upernet_ref.perf.late_upsampling import conv_of_resized

    gen = torch.Generator().manual_seed(2)
    cases = [(8, 4, (1, 2, 3, 6), 12, 12), (8, 4, (1, 2, 3, 6), 9, 13), (6, 3, (1, 2, 3, 6), 5, 4),
             (5, 2, (1, 3), 7, 11), (8, 4, (1, 2, 3, 6), 1, 1)]
    for cin, cout, scales, h, w in cases:
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        ppm = randomize_batchnorm(PyramidPooling(cin, cout, scales)).eval()
        state = {k: v.detach() for k, v in ppm.state_dict().items()}
        x = torch.randn(2, cin, h, w, generator=gen)
        case = f"a PyramidPooling({cin}, {cout}, {scales}) on x of shape {tuple(x.shape)}"
        with torch.no_grad():
            got = _run("ppm", answer, (x, ppm), case, block=[PyramidPooling.forward, conv_of_resized], hints=[
                ("channels", "the bottleneck takes C5 itself and every upsampled branch, concatenated "
                             "along channels (dim=1)"),
                ("size", "each branch is upsampled back to the size of x before the concatenation")])
            _check("ppm", got, _ref_ppm(x, state, scales), case, [
                ("align_corners=True: the model upsamples with align_corners=False (use `resize`)",
                 lambda: _ref_ppm(x, state, scales, align_corners=True)),
                ("the 1x1 branch ran after the upsampling: pool, branch, then upsample",
                 lambda: _ref_ppm(x, state, scales, conv_after_upsampling=True)),
                ("max pooling: the PPM averages each bin (adaptive_avg_pool2d)",
                 lambda: _ref_ppm(x, state, scales, pool=F.adaptive_max_pool2d))], 1e-4, 1e-5)
    _passed("ppm", len(cases))


def _ref_top_down(levels: list[torch.Tensor], cumulative: bool = True,
                  align_corners: bool = False) -> list[torch.Tensor]:
    merged = list(levels)
    for i in range(len(levels) - 1, 0, -1):
        above = merged[i] if cumulative else levels[i]
        merged[i - 1] = merged[i - 1] + _resize(above, merged[i - 1].shape[-2:], align_corners)
    return merged


def check_top_down(answer: typing.Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
    """03: `answer(laterals)` = the top-down pathway (each level + the upsampled merged level above)."""
    __tracebackhide__ = True
    from upernet_ref.model.head import UPerHead

    gen = torch.Generator().manual_seed(3)
    geometries = [((16, 8, 8, 8), "output stride 8"), ((32, 16, 8, 4), "output stride 32"),
                  ((16, 8, 8, 4), "output stride 16"), ((15, 8, 4, 2), "odd sizes"),
                  ((12, 6, 3, 2), "small odd sizes")]
    for sizes, what in geometries:
        laterals = [torch.randn(2, 3, s, s + 1, generator=gen) for s in sizes]
        case = f"laterals of sizes {[tuple(t.shape[-2:]) for t in laterals]} ({what})"
        got = _run("top_down", answer, ([t.clone() for t in laterals],), case, block=[UPerHead.fpn_features])
        if not isinstance(got, (list, tuple)) or len(got) != len(laterals):
            _fail(f"top_down: expected a list of {len(laterals)} tensors for {case}, got {_describe(got)}")
        expected = _ref_top_down(laterals)
        for name, wrong in (("not cumulative: each level got the raw lateral above it, not the "
                             "already merged level (go from the top down, adding the merged sum)",
                             _ref_top_down(laterals, cumulative=False)),
                            ("align_corners=True: the model upsamples with align_corners=False (use `resize`)",
                             _ref_top_down(laterals, align_corners=True))):
            if all(_matches(g, w, 1e-4, 1e-5) for g, w in zip(got, wrong)) and not all(
                    _matches(w, e, 1e-4, 1e-5) for w, e in zip(wrong, expected)):
                _fail(f"top_down: {name} (for {case})")
        for level, (g, e) in enumerate(zip(got, expected)):
            compare("top_down", g, e, f"level {level} of {case}", 1e-4, 1e-5)
    _passed("top_down", len(geometries))


def _ref_rescale_size(height: int, width: int, scale, short_only: bool = False,
                      rounding=lambda v: math.floor(v + 0.5)) -> tuple[int, int]:
    long_edge, short_edge = max(scale), min(scale)
    factor = short_edge / min(height, width)
    if not short_only:
        factor = min(factor, long_edge / max(height, width))
    return rounding(height * factor), rounding(width * factor)


def check_rescale_size(answer: typing.Callable[[int, int, tuple[float, float]], tuple[int, int]]) -> None:
    """04: `answer(height, width, (long, short))` = the size after fitting into the scale."""
    __tracebackhide__ = True
    from upernet_ref.data import transforms

    rng = random.Random(4)
    cases = [(512, 683, (2048, 512), "a VOC-like image"), (1024, 2048, (2048, 1024), "Cityscapes"),
             (100, 1000, (2048, 512), "a long thin image: the long side decides"),
             (13, 20, (10, 6.5), "an exact .5 (6.5 rounds to 7, as int(x + 0.5))"),
             (500, 333, (1024, 256), "a portrait image")]
    while len(cases) < 16:
        long_edge = rng.randint(64, 2048)
        cases.append((rng.randint(16, 1500), rng.randint(16, 1500),
                      (long_edge, rng.randint(16, long_edge)), "a random image and scale"))
    for h, w, scale, what in cases:
        case = f"a {h}x{w} image into scale {scale} ({what})"
        got = _run("rescale_size", answer, (h, w, scale), case, block=[transforms.rescale_size])
        if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(isinstance(v, int) for v in got):
            _fail(f"rescale_size: expected a (height, width) pair of ints for {case}, got {_describe(got)}")
        expected = _ref_rescale_size(h, w, scale)
        _check("rescale_size", tuple(got), expected, case, [
            ("only the short side was fitted: the long side must fit too (take the smaller factor)",
             lambda: _ref_rescale_size(h, w, scale, short_only=True)),
            ("Python's round() rounds .5 to even: round as int(x + 0.5), like mmcv",
             lambda: _ref_rescale_size(h, w, scale, rounding=round)),
            ("truncated with int(x): round as int(x + 0.5)",
             lambda: _ref_rescale_size(h, w, scale, rounding=int)),
            ("height and width are swapped: return (height, width)",
             lambda: _ref_rescale_size(h, w, scale)[::-1])], 0, 0)
    _passed("rescale_size", len(cases))


def _ref_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                       over_all_pixels: bool = False) -> torch.Tensor:
    valid = target != ignore_index
    log_p = logits.double().log_softmax(1)
    picked = torch.zeros(target.shape, dtype=torch.float64)
    for k in range(logits.shape[1]):  # the log-probability of each pixel's true class
        picked = torch.where(target == k, log_p[:, k], picked)
    count = target.numel() if over_all_pixels else int(valid.sum())
    return -(picked * valid).sum() / max(count, 1)


def check_cross_entropy(answer: typing.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """05: `answer(logits, target)` = mean CE over the pixels whose label is not 255 (0 if none)."""
    __tracebackhide__ = True
    from upernet_ref.training import losses

    gen = torch.Generator().manual_seed(5)
    cases = []
    for b, k, h, w in ((2, 5, 6, 7), (1, 3, 4, 4), (3, 8, 5, 9), (2, 2, 3, 3)):
        target = torch.randint(0, k, (b, h, w), generator=gen)
        target[torch.rand(b, h, w, generator=gen) < 0.3] = 255
        cases.append((torch.randn(b, k, h, w, generator=gen) * 3, target, f"{b}x{k}x{h}x{w} logits, ~30% ignored"))
    cases.append((torch.randn(2, 4, 5, 5, generator=gen), torch.full((2, 5, 5), 255),
                  "an all-ignored batch (expected 0, not NaN)"))
    one = torch.full((1, 3, 3), 255)
    one[0, 1, 1] = 2
    cases.append((torch.randn(1, 3, 3, 3, generator=gen), one, "a batch with a single valid pixel"))
    for logits, target, case in cases:
        got = _run("cross_entropy", answer, (logits, target), case,
                   block=[losses.cross_entropy, losses.segmentation_loss], hints=[
                       ("out of bounds", "255 was not removed: mask the ignored pixels before gathering"),
                       ("Target 255", "255 was not removed: mask the ignored pixels (or ignore_index=255)")])
        expected = _ref_cross_entropy(logits, target)
        if isinstance(got, torch.Tensor) and got.dim() != 0:
            _fail(f"cross_entropy: expected a scalar tensor for {case}, got {_describe(got)}")
        if isinstance(got, torch.Tensor) and bool(torch.isnan(got)) and float(expected) == 0.0:
            _fail(f"cross_entropy: NaN for {case}: no pixel is valid, so divide by max(1, the "
                  f"number of valid pixels)")
        _check("cross_entropy", got, expected, case, [
            ("averaged over every pixel: 255 was not removed from the count (divide by the "
             "number of valid pixels)", lambda: _ref_cross_entropy(logits, target, over_all_pixels=True)),
            ("the sign is wrong: the loss is minus the log-probability", lambda: -expected)], 1e-5, 1e-6)
    _passed("cross_entropy", len(cases))


def _ref_poly_lr(iteration: int, max_iters: int, base_lr: float, min_lr: float, power: float,
                 warmup_iters: int, warmup_ratio: float, warmup: bool = True, add_min: bool = True) -> float:
    t = min(max(iteration, 0), max_iters)
    lr = (base_lr - min_lr) * (1 - t / max_iters) ** power + (min_lr if add_min else 0.0)
    if warmup and iteration < warmup_iters:
        lr = lr * (warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters)
    return lr


def check_poly_lr(answer: typing.Callable[..., float]) -> None:
    """06: `answer(iteration, max_iters, base_lr, min_lr, power, warmup_iters, warmup_ratio)`."""
    __tracebackhide__ = True
    from upernet_ref.training import schedule

    rng = random.Random(6)
    cases = [(0, 1000, 0.01, 1e-4, 0.9, 0, 0.1), (500, 1000, 0.01, 1e-4, 0.9, 0, 0.1),
             (1000, 1000, 0.01, 1e-4, 0.9, 0, 0.1), (1200, 1000, 0.01, 1e-4, 0.9, 0, 0.1),
             (0, 1000, 0.01, 1e-4, 0.9, 100, 0.1), (50, 1000, 0.01, 1e-4, 0.9, 100, 0.1),
             (100, 1000, 0.01, 1e-4, 0.9, 100, 0.1), (999, 1000, 0.01, 0.0, 1.0, 0, 0.1)]
    while len(cases) < 20:
        max_iters = rng.randint(10, 5000)
        cases.append((rng.randint(0, max_iters + 10), max_iters, rng.choice((0.01, 0.02, 0.05)),
                      rng.choice((0.0, 1e-4)), rng.choice((0.9, 1.0)),
                      rng.choice((0, 0, rng.randint(1, max_iters))), rng.choice((1e-6, 0.1, 0.5))))
    names = "iteration, max_iters, base_lr, min_lr, power, warmup_iters, warmup_ratio".split(", ")
    for args in cases:
        case = ", ".join(f"{n}={v}" for n, v in zip(names, args))
        got = _run("poly_lr", answer, args, case, block=[schedule.poly_lr, schedule.PolyLR.get_lr],
                   hints=[("division by zero", "warmup_iters can be 0: only warm up when "
                                               "iteration < warmup_iters")])
        if isinstance(got, complex):
            _fail(f"poly_lr: a complex number for {case}: past max_iters, 1 - t / max_iters is "
                  f"negative; clamp the iteration to max_iters")
        _check("poly_lr", got, _ref_poly_lr(*args), case, [
            ("no warmup: during the first warmup_iters iterations, scale the lr from warmup_ratio up to 1",
             lambda: _ref_poly_lr(*args, warmup=False)),
            ("min_lr was not added back: the curve goes from base_lr down to min_lr",
             lambda: _ref_poly_lr(*args, add_min=False))], 1e-9, 1e-12)
    _passed("poly_lr", len(cases))


def _ref_confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    keep = target != 255
    t = F.one_hot(target[keep].long(), num_classes)  # (N, C): one row per counted pixel
    p = F.one_hot(pred[keep].long(), num_classes)
    return t.T @ p  # [i, j] = pixels of truth i predicted as j


def check_confusion_matrix(answer: typing.Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> None:
    """07: `answer(pred, target, num_classes)` = the (C, C) matrix, rows = truth, 255 skipped."""
    __tracebackhide__ = True
    from upernet_ref.evaluation import metrics

    gen = torch.Generator().manual_seed(7)
    cases = []
    for b, h, w, c in ((3, 5, 6, 4), (1, 8, 8, 6), (2, 4, 7, 3), (2, 6, 6, 5)):
        pred, target = torch.randint(0, c, (b, h, w), generator=gen), torch.randint(0, c, (b, h, w), generator=gen)
        target[torch.rand(b, h, w, generator=gen) < 0.2] = 255
        cases.append((pred, target, c, f"{b} random {h}x{w} maps, {c} classes, ~20% labelled 255"))
    pred, target = torch.randint(0, 3, (2, 6, 6), generator=gen), torch.randint(0, 3, (2, 6, 6), generator=gen)
    target[0, 0] = 255
    cases.append((pred, target, 5, "5 classes whose last two never occur (in truth or prediction)"))
    cases.append((torch.zeros(1, 3, 3, dtype=torch.long), torch.full((1, 3, 3), 255), 3, "an all-ignored map"))
    for pred, target, c, case in cases:
        got = _run("confusion_matrix", answer, (pred, target, c), case,
                   block=[metrics.confusion_matrix, metrics.ConfusionMatrix.update], hints=[
                       ("invalid for input of size", "bincount's result is shorter than C x C when the "
                        "last classes never occur: pass minlength=num_classes ** 2"),
                       ("shape", "bincount's result is shorter than C x C when the last classes never "
                        "occur: pass minlength=num_classes ** 2")])
        expected = _ref_confusion_matrix(pred, target, c)
        if isinstance(got, torch.Tensor) and got.dtype.is_floating_point:
            _fail(f"confusion_matrix: dtype {got.dtype} for {case}; counts are integers")
        keep255 = target.clamp(max=c - 1)
        _check("confusion_matrix", got, expected, case, [
            ("rows and columns are swapped (row = ground truth, column = prediction)", lambda: expected.T),
            ("255 was not removed (it was counted as the last class)",
             lambda: _ref_confusion_matrix(pred, keep255, c))], 0, 0)
    _passed("confusion_matrix", len(cases))


def _ref_iou(matrix: torch.Tensor) -> torch.Tensor:
    m = matrix.double()
    out = torch.full((m.shape[0],), float("nan"), dtype=torch.float64)
    for k in range(m.shape[0]):
        union = m[k, :].sum() + m[:, k].sum() - m[k, k]
        if union > 0:
            out[k] = m[k, k] / union
    return out


def check_iou(answer: typing.Callable[[torch.Tensor], torch.Tensor]) -> None:
    """07: `answer(matrix)` = per-class IoU (NaN for a class absent from truth and prediction)."""
    __tracebackhide__ = True
    from upernet_ref.evaluation import metrics

    gen = torch.Generator().manual_seed(8)
    cases = [(torch.tensor([[50, 2, 3, 0], [4, 30, 0, 0], [1, 0, 10, 0], [0, 0, 0, 0]]),
              "a matrix whose class 3 never occurs (neither truth nor prediction: NaN)"),
             (torch.tensor([[20, 5, 0], [0, 10, 0], [0, 0, 0]]) + torch.tensor([[0, 0, 3], [0, 0, 0], [0, 0, 0]]),
              "class 2 predicted but absent from the truth (IoU 0, not NaN)"),
             (torch.tensor([[20, 0, 0], [3, 10, 0], [4, 1, 0]]),
              "class 2 in the truth but never predicted (IoU 0)")]
    for c in (3, 5, 6):
        cases.append((torch.randint(0, 40, (c, c), generator=gen), f"a random {c}-class matrix"))
    for matrix, case in cases:
        got = _run("iou", answer, (matrix.clone(),), case, block=[metrics.summarize])
        expected = _ref_iou(matrix)
        got = got.double() if isinstance(got, torch.Tensor) else got
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            both = torch.isnan(got) & (expected == 0)
            if both.any():
                k = int(both.nonzero()[0])
                _fail(f"iou: NaN for class {k} in {case}: its union (truth + prediction - overlap) "
                      f"is not empty, so its IoU is 0; NaN only when the union is empty")
            empty = ~torch.isnan(got) & torch.isnan(expected)
            if empty.any():
                k = int(empty.nonzero()[0])
                _fail(f"iou: {got[k].item():.6g} for class {k} in {case}: it occurs neither in the "
                      f"truth nor in the prediction (empty union), so its IoU is NaN and the mIoU "
                      f"skips it")
        m = matrix.double()
        _check("iou", got, expected, case, [
            ("divided by the ground-truth count only: that is the class accuracy, not the IoU "
             "(union = truth + prediction - overlap)", lambda: m.diagonal() / m.sum(1)),
            ("divided by the prediction count only (union = truth + prediction - overlap)",
             lambda: m.diagonal() / m.sum(0)),
            ("the overlap was counted twice in the union (subtract the diagonal once)",
             lambda: m.diagonal() / (m.sum(0) + m.sum(1)))], 1e-6, 1e-9)
    _passed("iou", len(cases))


def check_segmentation_loss(answer: typing.Callable[[dict, torch.Tensor], torch.Tensor]) -> None:
    """08: `answer(outputs, target)` = the published loss: CE(out) + 0.4 x CE(aux)."""
    __tracebackhide__ = True
    from upernet_ref.training import losses

    gen = torch.Generator().manual_seed(9)
    cases = []
    for b, k, h, w in ((2, 3, 8, 8), (1, 5, 6, 9), (3, 4, 5, 5)):
        target = torch.randint(0, k, (b, h, w), generator=gen)
        target[:, :2] = 255
        cases.append(({"out": torch.randn(b, k, h, w, generator=gen), "aux": torch.randn(b, k, h, w, generator=gen)},
                      target, f"{b} images, {k} classes, {h}x{w}, two rows ignored"))
    cases.append(({"out": torch.randn(2, 3, 4, 4, generator=gen), "aux": torch.randn(2, 3, 4, 4, generator=gen)},
                  torch.full((2, 4, 4), 255), "an all-ignored batch (expected 0, not NaN)"))
    for outputs, target, case in cases:
        got = _run("training_loss", answer, ({k: v.clone() for k, v in outputs.items()}, target), case,
                   block=[losses.segmentation_loss, losses.cross_entropy])
        ce_out, ce_aux = _ref_cross_entropy(outputs["out"], target), _ref_cross_entropy(outputs["aux"], target)
        expected = ce_out + 0.4 * ce_aux
        if isinstance(got, torch.Tensor) and got.dim() == 0 and bool(torch.isnan(got)) and float(expected) == 0:
            _fail(f"training_loss: NaN for {case}: with no valid pixel each cross-entropy is 0 "
                  f"(divide by max(1, the number of valid pixels))")
        _check("training_loss", got, expected, case, [
            ("the auxiliary loss has weight 1: the recipe weighs it 0.4", lambda: ce_out + ce_aux),
            ("the auxiliary loss is missing (+ 0.4 x CE of outputs['aux'])", lambda: ce_out),
            ("0.4 weighs the main loss instead of the auxiliary one", lambda: 0.4 * ce_out + ce_aux)], 1e-5, 1e-6)
    _passed("training_loss", len(cases))


class _Logits(nn.Module):
    """A tiny model that returns {"out": logits}, as the package's models do."""

    def __init__(self, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 3, padding=1))

    def forward(self, x):
        return {"out": self.net(x)}


def check_flip_inference(answer: typing.Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """09: `answer(model, image)` = softmax averaged over the image and its mirror (flipped back)."""
    __tracebackhide__ = True
    from upernet_ref.evaluation import inference

    gen = torch.Generator().manual_seed(10)
    cases = []
    for classes, h, w in ((3, 10, 14), (5, 7, 9), (2, 12, 5)):
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        cases.append((_Logits(classes).eval(), torch.randn(1, 3, h, w, generator=gen) * 2,
                      f"a {h}x{w} image, {classes} classes"))
    for model, image, case in cases:
        with torch.no_grad():
            got = _run("flip_inference", answer, (model, image.clone()), case,
                       block=[inference.inference, inference.whole_inference, inference._accumulate])
            logits, mirror = model(image)["out"], model(image.flip(-1))["out"]
            expected = (logits.softmax(1) + mirror.flip(-1).softmax(1)) / 2
            _check("flip_inference", got, expected, case, [
                ("you averaged logits, not probabilities: softmax each view, then average",
                 lambda: ((logits + mirror.flip(-1)) / 2).softmax(1)),
                ("the mirror image was not flipped back before averaging",
                 lambda: (logits.softmax(1) + mirror.softmax(1)) / 2),
                ("the probabilities were summed, not averaged (divide by the 2 views)",
                 lambda: logits.softmax(1) + mirror.flip(-1).softmax(1)),
                ("the mirror image is missing: average the image's and its mirror's probabilities",
                 lambda: logits.softmax(1)),
                ("the image was flipped upside down: the mirror flips the width (dim -1)",
                 lambda: (logits.softmax(1) + model(image.flip(-2))["out"].flip(-2).softmax(1)) / 2)],
                1e-5, 1e-6)
    _passed("flip_inference", len(cases))


# --------------------------------------------------------------------------------------------
# The ramp's other exercises (warm-up, core, stretch in each notebook)

@contextlib.contextmanager
def _hidden(table: dict) -> typing.Iterator[None]:
    """While inside, `table` (a package constant the exercise asks for) is empty."""
    saved = dict(table)
    table.clear()
    try:
        yield
    finally:
        table.update(saved)


def _ref_strides_and_dilations(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    strides, dilations, reached, dilation = [], [], 4, 1  # the stem and its max pool: 1/4
    for s in (1, 2, 2, 2):
        if reached * s <= output_stride:
            strides.append(s)
            reached *= s
        else:
            strides.append(1)
            dilation *= s
        dilations.append(dilation)
    return tuple(strides), tuple(dilations)


def check_strides_and_dilations(answer: typing.Callable[[int], tuple]) -> None:
    """01: `answer(output_stride)` = ((stride of stage 1..4), (dilation of stage 1..4))."""
    __tracebackhide__ = True
    from upernet_ref.model import backbone

    cases = [4, 8, 16, 32]
    for os_ in cases:
        case = f"output_stride={os_}"
        with _hidden(backbone.STRIDES_DILATIONS):
            got = _run("strides_and_dilations", answer, (os_,), case, hints=[
                ("KeyError", "STRIDES_DILATIONS is emptied while your answer runs: derive the table "
                             "from the rule")])
        strides, dilations = _ref_strides_and_dilations(os_)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            _fail(f"strides_and_dilations: expected (strides, dilations) for {case}, got {_describe(got)}")
        got = (tuple(got[0]), tuple(got[1]))
        if got[0] != strides:
            _fail(f"strides_and_dilations: strides {got[0]} for {case}, expected {strides} (a stage "
                  f"strides only while the output stride is not yet reached)")
        if got[1] != dilations:
            hint = (" (each removed stride of 2 doubles the dilation of that stage and of every "
                    "later one: multiply, do not reset)")
            _fail(f"strides_and_dilations: dilations {got[1]} for {case}, expected {dilations}{hint}")
    _passed("strides_and_dilations", len(cases))


def _ref_bottleneck(x: torch.Tensor, state: dict[str, torch.Tensor], stride: int, dilation: int,
                    stride_on_1x1: bool = False, relu_before_add: bool = False,
                    shortcut: bool = True) -> torch.Tensor:
    def bn(y, name):
        return F.batch_norm(y, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    y = bn(F.conv2d(x, state["conv1.weight"], stride=stride if stride_on_1x1 else 1), "bn1").clamp(min=0)
    y = bn(F.conv2d(y, state["conv2.weight"], stride=1 if stride_on_1x1 else stride, padding=dilation,
                    dilation=dilation), "bn2").clamp(min=0)
    y = bn(F.conv2d(y, state["conv3.weight"]), "bn3")
    if "downsample.0.weight" in state:
        identity = bn(F.conv2d(x, state["downsample.0.weight"], stride=stride), "downsample.1")
    else:
        identity = x
    if relu_before_add:
        return y.clamp(min=0) + identity
    return (y + identity if shortcut else y).clamp(min=0)


def check_bottleneck(answer: typing.Callable[[int, int, int, int], nn.Module]) -> None:
    """01: `answer(cin, planes, stride, dilation)` = a v1c bottleneck block with the package's names."""
    __tracebackhide__ = True
    from upernet_ref.model.backbone import Bottleneck

    gen = torch.Generator().manual_seed(11)
    cases = [(16, 4, 1, 1, "identity shortcut"), (16, 8, 2, 1, "stride 2 (a strided 1x1 shortcut)"),
             (16, 4, 1, 2, "dilation 2"), (8, 4, 1, 1, "cin != 4 x planes (a 1x1 shortcut)"),
             (16, 8, 1, 4, "dilation 4, a 1x1 shortcut")]
    for cin, planes, stride, dilation, what in cases:
        case = f"cin={cin}, planes={planes}, stride={stride}, dilation={dilation} ({what})"
        with blocked(Bottleneck.forward):
            block = _run("bottleneck", answer, (cin, planes, stride, dilation), case)
            if not isinstance(block, nn.Module):
                _fail(f"bottleneck: expected an nn.Module for {case}, got {_describe(block)}")
            downsample = (nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))
                          if stride != 1 or cin != 4 * planes else None)
            reference = Bottleneck(cin, planes, stride, dilation, downsample)  # its names and shapes
            want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
            have = {k: tuple(v.shape) for k, v in block.state_dict().items()}
            if have != want:
                missing = sorted(set(want) - set(have))[:3]
                extra = sorted(set(have) - set(want))[:3]
                wrong = [k for k in want if k in have and have[k] != want[k]][:3]
                _fail(f"bottleneck: its state_dict does not fit the package's for {case}: "
                      f"missing {missing}, unexpected {extra}, other shapes {[(k, have[k], want[k]) for k in wrong]}")
            torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
            randomize_batchnorm(reference)
            block.load_state_dict(reference.state_dict())
            state = {k: v.detach() for k, v in reference.state_dict().items()}
            x = torch.randn(2, cin, 9, 10, generator=gen)
            with torch.no_grad():
                got = _run("bottleneck", block.eval(), (x,), f"the forward pass, {case}")
                _check("bottleneck", got, _ref_bottleneck(x, state, stride, dilation), case, [
                    ("the stride is on the first 1x1 conv (the caffe / v1b style): the v1c block strides its 3x3 conv",
                     lambda: _ref_bottleneck(x, state, stride, dilation, stride_on_1x1=True)),
                    ("ReLU before the addition: add the shortcut, then apply the last ReLU",
                     lambda: _ref_bottleneck(x, state, stride, dilation, relu_before_add=True)),
                    ("the shortcut is missing: add x (or downsample(x)) before the last ReLU",
                     lambda: _ref_bottleneck(x, state, stride, dilation, shortcut=False))], 1e-4, 1e-5)
    _passed("bottleneck", len(cases))


def _ref_bin_edges(n: int, s: int) -> list[tuple[int, int]]:
    return [((i * n) // s, -((-(i + 1) * n) // s)) for i in range(s)]


def check_bin_edges(answer: typing.Callable[[int, int], list]) -> None:
    """02: `answer(n, s)` = the [start, end) pixel range of each of the s adaptive-pooling bins."""
    __tracebackhide__ = True
    rng = random.Random(12)
    cases = [(64, 1), (64, 2), (64, 3), (64, 6), (13, 6), (5, 6), (7, 3)]
    cases += [(rng.randint(1, 80), rng.randint(1, 9)) for _ in range(13)]
    for n, s in cases:
        case = f"n={n} pixels, s={s} bins"
        got = _run("bin_edges", answer, (n, s), case)
        expected = _ref_bin_edges(n, s)
        if not isinstance(got, (list, tuple)) or [tuple(b) for b in got] != expected:
            even = [(i * (n // s), (i + 1) * (n // s)) for i in range(s)]
            floor_end = [((i * n) // s, ((i + 1) * n) // s) for i in range(s)]
            got_list = [tuple(b) for b in got] if isinstance(got, (list, tuple)) else got
            if got_list == even and even != expected:
                _fail(f"bin_edges: equal bins of n // s pixels for {case}: PyTorch's bins start at "
                      f"floor(i n / s) and end at ceil((i + 1) n / s), so they cover every pixel and may overlap")
            if got_list == floor_end and floor_end != expected:
                _fail(f"bin_edges: the ends are rounded down for {case}: a bin ends at ceil((i + 1) n / s)")
            _fail(f"bin_edges: {got_list!r} for {case}, expected {expected}"[:400])
    _passed("bin_edges", len(cases))


def _ref_crop_ok(mask: torch.Tensor, cat_max_ratio: float, ignore_index: int = 255,
                 count_ignored: bool = False, single_ok: bool = False, at_most: bool = False) -> bool:
    values, counts = torch.unique(mask, return_counts=True)
    if not count_ignored:
        counts = counts[values != ignore_index]
    if len(counts) < 2:
        return single_ok and len(counts) == 1
    share = counts.max().item() / counts.sum().item()
    return share <= cat_max_ratio if at_most else share < cat_max_ratio


def check_crop_is_acceptable(answer: typing.Callable[[torch.Tensor, float], bool]) -> None:
    """04: `answer(mask_crop, cat_max_ratio)` = whether the class-ratio crop keeps this crop."""
    __tracebackhide__ = True
    from upernet_ref.data import transforms

    gen = torch.Generator().manual_seed(13)
    cases = []
    for classes, ratio in ((2, 0.75), (3, 0.75), (4, 0.5), (1, 0.75), (5, 0.9)):
        for _ in range(3):
            mask = torch.randint(0, classes, (6, 8), generator=gen)
            dominant = torch.rand(6, 8, generator=gen) < float(torch.rand((), generator=gen))
            mask[dominant] = 0
            mask[torch.rand(6, 8, generator=gen) < 0.3] = 255
            cases.append((mask, ratio, f"a random 6x8 crop, cat_max_ratio={ratio}"))
    exact = torch.tensor([[0, 0, 0, 1]] * 2)
    cases.append((exact, 0.75, "a crop whose class 0 covers exactly 75% (redrawn: 'covers >= cat_max_ratio')"))
    ignored = torch.tensor([[0, 0, 255, 255], [0, 1, 255, 255]])
    cases.append((ignored, 0.8, "a crop with 255 pixels (not counted: 3 of 4 labelled pixels are class 0)"))
    cases.append((torch.zeros(4, 4, dtype=torch.long), 0.75, "a crop of one class only (redrawn)"))
    cases.append((torch.full((4, 4), 255), 0.75, "an all-ignored crop (redrawn: fewer than two classes)"))
    for mask, ratio, case in cases:
        got = _run("crop_is_acceptable", answer, (mask.clone(), ratio), case, block=[transforms.random_crop])
        if not isinstance(got, (bool, torch.Tensor)) or (isinstance(got, torch.Tensor) and got.numel() != 1):
            _fail(f"crop_is_acceptable: expected True or False for {case}, got {_describe(got)}")
        got, expected = bool(got), _ref_crop_ok(mask, ratio)
        if got == expected:
            continue
        for message, wrong in (
                ("a crop with a single class was kept: it needs at least two classes", dict(single_ok=True)),
                ("255 was counted as a class: leave the ignored pixels out", dict(count_ignored=True)),
                ("a class covering exactly cat_max_ratio was accepted: redraw when one covers that much or more",
                 dict(at_most=True))):
            if _ref_crop_ok(mask, ratio, **wrong) == got:
                _fail(f"crop_is_acceptable: {message} (for {case})")
        _fail(f"crop_is_acceptable: {got} for {case}, expected {expected}")
    _passed("crop_is_acceptable", len(cases))


def check_hflip_pair(answer: typing.Callable[[torch.Tensor, torch.Tensor], tuple]) -> None:
    """04: `answer(image, mask)` = the image (3, H, W) and its mask (H, W) mirrored left-right."""
    __tracebackhide__ = True
    from upernet_ref.data import transforms

    gen = torch.Generator().manual_seed(14)
    cases = [(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
              torch.randint(0, 5, (h, w), generator=gen)) for h, w in ((4, 6), (5, 5), (7, 3))]
    for image, mask in cases:
        case = f"an image of shape {tuple(image.shape)}"
        got = _run("hflip_pair", answer, (image.clone(), mask.clone()), case, block=[transforms.random_hflip])
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            _fail(f"hflip_pair: expected (image, mask) for {case}, got {_describe(got)}")
        for name, g, e, other in (("image", got[0], image.flip(-1), image), ("mask", got[1], mask.flip(-1), mask)):
            if isinstance(g, torch.Tensor) and g.shape == e.shape and torch.equal(g, other) and not torch.equal(e, other):
                _fail(f"hflip_pair: the {name} was not flipped (flip both, together) (for {case})")
            if isinstance(g, torch.Tensor) and g.shape == e.shape and torch.equal(g, other.flip(-2)):
                _fail(f"hflip_pair: the {name} was flipped upside down: left-right is the last dim (for {case})")
            compare(f"hflip_pair ({name})", g, e, case, 0, 0)
    _passed("hflip_pair", len(cases))


def _ref_ohem(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
              per_image: bool = True, use_min_kept: bool = True) -> torch.Tensor:
    valid = target != 255
    p = logits.double().softmax(1)
    p_true = torch.zeros(target.shape, dtype=torch.float64)
    for k in range(logits.shape[1]):
        p_true = torch.where(target == k, p[:, k], p_true)
    threshold = thresh
    ranked = p_true[valid].sort().values
    if use_min_kept and ranked.numel():
        k = min(min_kept * (target.shape[0] if per_image else 1), ranked.numel() - 1)
        threshold = max(ranked[k].item(), thresh)
    return valid & (p_true < threshold)


def check_ohem_mask(answer: typing.Callable[..., torch.Tensor]) -> None:
    """05: `answer(logits, target, thresh, min_kept)` = the (B, H, W) bool mask of the pixels OHEM keeps."""
    __tracebackhide__ = True
    from upernet_ref.training import losses

    gen = torch.Generator().manual_seed(15)
    cases = []
    for b, k, thresh, min_kept in ((2, 4, 0.7, 10), (1, 3, 0.7, 40), (2, 5, 0.5, 3), (3, 3, 0.9, 100), (2, 4, 0.3, 25)):
        target = torch.randint(0, k, (b, 8, 9), generator=gen)
        target[torch.rand(b, 8, 9, generator=gen) < 0.2] = 255
        logits = torch.randn(b, k, 8, 9, generator=gen) * 3
        what = "fewer valid pixels than min_kept x B" if min_kept * b >= int((target != 255).sum()) else "random logits"
        cases.append((logits, target, thresh, min_kept, f"{b} images, {k} classes, thresh={thresh}, min_kept={min_kept} ({what})"))
    for logits, target, thresh, min_kept, case in cases:
        got = _run("ohem_mask", answer, (logits, target, thresh, min_kept), case,
                   block=[losses.ohem_mask, losses.segmentation_loss])
        expected = _ref_ohem(logits, target, thresh, min_kept)
        if isinstance(got, torch.Tensor) and got.dtype != torch.bool:
            _fail(f"ohem_mask: dtype {got.dtype} for {case}; return a bool mask")
        _check("ohem_mask", got, expected, case, [
            ("min_kept was not applied: keep at least the min_kept x B hardest valid pixels",
             lambda: _ref_ohem(logits, target, thresh, min_kept, use_min_kept=False)),
            ("min_kept counts per image: the threshold is the (min_kept x B)-th smallest probability",
             lambda: _ref_ohem(logits, target, thresh, min_kept, per_image=False)),
            ("ignored pixels were kept: only valid pixels (label != 255) can be kept",
             lambda: _ref_ohem(logits, target, thresh, min_kept) | (target == 255))], 0, 0)
    _passed("ohem_mask", len(cases))


def check_epochs_to_iters(answer: typing.Callable[[int, int, int], int]) -> None:
    """06: `answer(epochs, num_images, batch_size)` = the schedule's length in iterations."""
    __tracebackhide__ = True
    from upernet_ref.training import schedule

    rng = random.Random(16)
    cases = [(127, 10582, 16, "VOC aug (10,582 images, batch 16)"), (130, 20210, 16, "ADE20K"),
             (220, 2975, 8, "Cityscapes (batch 8)"), (3, 5, 8, "fewer images than one batch (one iteration an epoch)")]
    while len(cases) < 14:
        n, b = rng.randint(1, 30000), rng.choice((2, 4, 8, 16, 32))
        if (n / b) % 1 != 0.5:  # no exact .5: the model card never needs one
            cases.append((rng.randint(1, 300), n, b, "random sizes"))
    for epochs, n, b, what in cases:
        case = f"epochs={epochs}, num_images={n}, batch_size={b} ({what})"
        got = _run("epochs_to_iters", answer, (epochs, n, b), case,
                   block=[schedule.epochs_to_iters, schedule.iters_per_epoch])
        if not isinstance(got, int) or isinstance(got, bool):
            _fail(f"epochs_to_iters: expected an int for {case}, got {_describe(got)}")
        per_epoch = max(1, math.floor(n / b + 0.5))
        _check("epochs_to_iters", got, epochs * per_epoch, case, [
            ("rounded down (//): an epoch is images / batch rounded to the nearest integer, as the model card",
             lambda: epochs * max(1, n // b)),
            ("rounded up: an epoch is images / batch rounded to the nearest integer", lambda: epochs * max(1, -(-n // b))),
            ("the epochs are missing: the schedule is epochs x iterations per epoch", lambda: per_epoch),
            ("zero iterations an epoch: a split smaller than one batch still takes one iteration",
             lambda: epochs * math.floor(n / b + 0.5))], 0, 0)
    _passed("epochs_to_iters", len(cases))


def _ref_miou(pairs: typing.Sequence[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
              per_image: bool = False, absent_as_zero: bool = False) -> float:
    def miou(matrix):
        iou = _ref_iou(matrix)
        if absent_as_zero:
            iou = torch.nan_to_num(iou, nan=0.0)
        return iou[~torch.isnan(iou)].mean().item()

    matrices = [_ref_confusion_matrix(p, t, num_classes) for p, t in pairs]
    if per_image:
        return sum(miou(m) for m in matrices) / len(matrices)
    return miou(sum(matrices))


def check_miou_over_split(answer: typing.Callable[[list, int], float]) -> None:
    """07: `answer(pairs, num_classes)` = the mIoU (0..1) of a split of (prediction, target) maps."""
    __tracebackhide__ = True
    from upernet_ref.evaluation import metrics

    gen = torch.Generator().manual_seed(17)
    cases = []
    for images, c in ((4, 4), (3, 6), (6, 3)):
        pairs = []
        for _ in range(images):
            h, w = (int(v) for v in torch.randint(4, 12, (2,), generator=gen))
            present = int(torch.randint(2, c + 1, (), generator=gen))  # some classes absent from an image
            target = torch.randint(0, present, (h, w), generator=gen)
            pred = torch.where(torch.rand(h, w, generator=gen) < 0.7, target, torch.randint(0, c, (h, w), generator=gen))
            target[torch.rand(h, w, generator=gen) < 0.1] = 255
            pairs.append((pred, target))
        cases.append((pairs, c, f"{images} images of different sizes, {c} classes, some absent per image"))
    pairs = [(torch.randint(0, 3, (5, 6), generator=gen), torch.randint(0, 3, (5, 6), generator=gen)) for _ in range(3)]
    cases.append((pairs, 5, "3 images, 5 classes of which 3 and 4 occur nowhere in the split"))
    for pairs, c, case in cases:
        got = _run("miou_over_split", answer, ([(p.clone(), t.clone()) for p, t in pairs], c), case,
                   block=[metrics.confusion_matrix, metrics.summarize, metrics.ConfusionMatrix.update,
                          metrics.ConfusionMatrix.summary])
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        _check("miou_over_split", got, _ref_miou(pairs, c), case, [
            ("you averaged per-image mIoUs: add the images' confusion matrices over the split, then "
             "compute the IoU once", lambda: _ref_miou(pairs, c, per_image=True)),
            ("an absent class counted as IoU 0: leave it out (NaN, then a mean over the others)",
             lambda: _ref_miou(pairs, c, absent_as_zero=True)),
            ("a percentage: return the mIoU as a fraction (0..1)", lambda: 100 * _ref_miou(pairs, c))], 1e-6, 1e-9)
    _passed("miou_over_split", len(cases))


def _ref_sgd(param, grad, buf, lr, momentum, weight_decay, decay_after=False, use_buf=True, no_decay=False):
    d = grad if no_decay or decay_after else grad + weight_decay * param
    buf = momentum * buf + d
    step = buf if use_buf else d
    if decay_after:
        step = step + weight_decay * param
    return param - lr * step, buf


def check_sgd_update(answer: typing.Callable[..., tuple]) -> None:
    """08: `answer(param, grad, buf, lr, momentum, weight_decay)` = (new param, new momentum buffer)."""
    __tracebackhide__ = True
    from upernet_ref.training import schedule, trainer

    gen = torch.Generator().manual_seed(18)
    cases = []
    for shape, lr, momentum, wd in (((5,), 0.01, 0.9, 5e-4), ((3, 4), 0.1, 0.9, 1e-2), ((2, 3), 0.05, 0.0, 1e-3),
                                    ((4,), 0.01, 0.9, 0.0), ((6,), 0.2, 0.5, 0.1)):
        first = len(cases) % 2 == 0
        buf = torch.zeros(shape, dtype=torch.float64) if first else torch.randn(shape, generator=gen, dtype=torch.float64)
        cases.append((torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64),
                      buf, lr, momentum, wd, f"a {shape} parameter, lr={lr}, momentum={momentum}, weight_decay={wd}"
                      f"{' (first step: buffer of zeros)' if first else ''}"))
    for param, grad, buf, lr, momentum, wd, case in cases:
        args = (param.clone(), grad.clone(), buf.clone(), lr, momentum, wd)
        got = _run("sgd_update", answer, args, case, block=[trainer.train_step, schedule.build_optimizer])
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            _fail(f"sgd_update: expected (new param, new buffer) for {case}, got {_describe(got)}")
        new_param, new_buf = _ref_sgd(param, grad, buf, lr, momentum, wd)
        _check("sgd_update (buffer)", got[1], new_buf, case, [
            ("the weight decay is missing from the buffer: d = g + weight_decay x p goes into the momentum",
             lambda: _ref_sgd(param, grad, buf, lr, momentum, wd, decay_after=True)[1])], 1e-10, 1e-12)
        _check("sgd_update (param)", got[0], new_param, case, [
            ("the step used the gradient, not the momentum buffer: p <- p - lr x b",
             lambda: _ref_sgd(param, grad, buf, lr, momentum, wd, use_buf=False)[0]),
            ("the weight decay is missing", lambda: _ref_sgd(param, grad, buf, lr, momentum, wd, no_decay=True)[0])],
            1e-10, 1e-12)
    _passed("sgd_update", len(cases))


def _ref_slide(model: nn.Module, image: torch.Tensor, crop_size, stride, shift_back: bool = True,
               pad: bool = True, by_windows: bool = False) -> torch.Tensor:
    (h, w), (ch, cw), (sh, sw) = image.shape[-2:], crop_size, stride
    total = count = None
    rows = [min(r, max(h - ch, 0)) if shift_back else r for r in range(0, max(h - ch, 0) + sh, sh)]
    cols = [min(c, max(w - cw, 0)) if shift_back else c for c in range(0, max(w - cw, 0) + sw, sw)]
    windows = 0
    for y1 in sorted(set(rows)):
        for x1 in sorted(set(cols)):
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            crop = image[..., y1:y2, x1:x2]
            if pad:
                crop = F.pad(crop, (0, cw - crop.shape[-1], 0, ch - crop.shape[-2]))
            out = model(crop)["out"][..., : y2 - y1, : x2 - x1]
            if total is None:
                total = image.new_zeros(image.shape[0], out.shape[1], h, w)
                count = image.new_zeros(1, 1, h, w)
            total[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
            windows += 1
    return total / windows if by_windows else total / count


def check_slide_inference(answer: typing.Callable[..., torch.Tensor]) -> None:
    """09: `answer(model, image, crop_size, stride)` = logits averaged over overlapping windows."""
    __tracebackhide__ = True
    from upernet_ref.evaluation import inference

    gen = torch.Generator().manual_seed(19)
    cases = []
    for h, w, crop, stride, what in ((20, 27, (8, 8), (5, 5), "windows that do not fit evenly"),
                                     (16, 16, (8, 8), (8, 8), "windows that tile the image"),
                                     (12, 30, (12, 10), (6, 7), "a wide image"),
                                     (6, 9, (8, 12), (5, 8), "an image smaller than the crop (pad it, then cut)"),
                                     (10, 5, (8, 8), (4, 4), "an image narrower than the crop")):
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        cases.append((_Logits(3).eval(), torch.randn(1, 3, h, w, generator=gen), crop, stride,
                      f"a {h}x{w} image, crop {crop}, stride {stride} ({what})"))
    for model, image, crop, stride, case in cases:
        with torch.no_grad():
            got = _run("slide_inference", answer, (model, image.clone(), crop, stride), case,
                       block=[inference.slide_inference, inference.inference, inference.window_grid])
            expected = _ref_slide(model, image, crop, stride)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.isfinite(got).all():
                _fail(f"slide_inference: NaN or inf for {case}: some pixels were never in a window; "
                      f"shift the last window of each row and column back inside the image")
            _check("slide_inference", got, expected, case, [
                ("divided by the number of windows: divide each pixel's sum by how many windows saw it",
                 lambda: _ref_slide(model, image, crop, stride, by_windows=True)),
                ("the image smaller than the crop was not padded: pad it to the crop, run, then cut the "
                 "padding off", lambda: _ref_slide(model, image, crop, stride, pad=False)),
                ("you returned probabilities: the windows' logits are averaged (softmax comes after)",
                 lambda: expected.softmax(1))], 1e-5, 1e-6)
    _passed("slide_inference", len(cases))


def check_ppm_parameters(answer: typing.Callable[[int, int, tuple], int]) -> None:
    """02: `answer(cin, channels, pool_scales)` = the number of parameters of the PPM."""
    __tracebackhide__ = True
    from upernet_ref.model.ppm import PyramidPooling

    rng = random.Random(20)
    cases = [(2048, 512, (1, 2, 3, 6)), (64, 16, (1, 2, 3, 6)), (8, 4, (1, 3))]
    cases += [(rng.randint(1, 300), rng.randint(1, 100), tuple(sorted(rng.sample(range(1, 9), rng.randint(1, 4)))))
              for _ in range(7)]
    for cin, channels, scales in cases:
        case = f"PyramidPooling({cin}, {channels}, {scales})"
        got = _run("ppm_parameters", answer, (cin, channels, scales), case)
        with torch.device("meta"):
            expected = sum(t.numel() for t in PyramidPooling(cin, channels, scales).parameters())
        n, c = len(scales), channels
        _check("ppm_parameters", got, expected, case, [
            ("the BatchNorm weights and biases are missing (2 per channel, after every conv)",
             lambda: n * cin * c + (cin + n * c) * c * 9),
            ("the bottleneck is a 3x3 conv: 9 weights per input/output channel pair",
             lambda: n * (cin * c + 2 * c) + (cin + n * c) * c + 2 * c),
            ("C5 itself is part of the bottleneck's input (cin + branches x channels)",
             lambda: n * (cin * c + 2 * c) + n * c * c * 9 + 2 * c),
            ("the convs have no bias (a BatchNorm follows each)", lambda: expected + n * c + c)], 0, 0)
    _passed("ppm_parameters", len(cases))


def _ref_fuse(outs: list[torch.Tensor], state: dict[str, torch.Tensor], align_corners: bool = False,
              to_coarsest: bool = False) -> torch.Tensor:
    size = outs[-1].shape[-2:] if to_coarsest else outs[0].shape[-2:]
    cat = torch.cat([o if o.shape[-2:] == size else _resize(o, size, align_corners) for o in outs], 1)
    fused = _ref_conv_bn_relu(cat, state, "fuse.", padding=1)
    return F.conv2d(fused, state["classifier.weight"], state["classifier.bias"])


def check_fuse_and_classify(answer: typing.Callable[[list, nn.Module], torch.Tensor]) -> None:
    """03: `answer(outs, head)` = the head's logits at 1/4 from its four pyramid levels."""
    __tracebackhide__ = True
    from upernet_ref.model.head import UPerHead
    from upernet_ref.perf.late_upsampling import conv_of_resized

    gen = torch.Generator().manual_seed(21)
    cases = [((16, 8, 8, 8), "output stride 8"), ((16, 8, 4, 2), "output stride 32"),
             ((12, 6, 6, 3), "output stride 16"), ((9, 5, 5, 5), "odd sizes")]
    for sizes, what in cases:
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        head = randomize_batchnorm(UPerHead((4, 4, 4, 4), 4, 3)).eval()
        state = {k: v.detach() for k, v in head.state_dict().items()}
        outs = [torch.randn(2, 4, s, s, generator=gen) for s in sizes]
        case = f"levels of sizes {[s for s in sizes]} ({what})"
        with torch.no_grad():
            got = _run("fuse_and_classify", answer, ([o.clone() for o in outs], head), case,
                       block=[UPerHead.forward, conv_of_resized], hints=[
                           ("channels", "the fusion conv takes the four levels concatenated along channels (dim=1)"),
                           ("Sizes of tensors", "upsample every level to the finest one (outs[0]) before concatenating")])
            _check("fuse_and_classify", got, _ref_fuse(outs, state), case, [
                ("align_corners=True: the model upsamples with align_corners=False (use `resize`)",
                 lambda: _ref_fuse(outs, state, align_corners=True)),
                ("the levels were brought to the coarsest size: upsample them to the finest, 1/4",
                 lambda: _ref_fuse(outs, state, to_coarsest=True))], 1e-4, 1e-5)
    _passed("fuse_and_classify", len(cases))


def check_laterals(answer: typing.Callable[[list, nn.Module], list]) -> None:
    """03: `answer(feats, head)` = the four pyramid inputs: 1x1 laterals on C2..C4, the PPM on C5."""
    __tracebackhide__ = True
    from upernet_ref.model.head import UPerHead

    gen = torch.Generator().manual_seed(22)
    cases = [((4, 6, 8, 10), (16, 8, 8, 8), "output stride 8"), ((3, 5, 7, 9), (16, 8, 4, 2), "output stride 32"),
             ((2, 4, 6, 8), (9, 5, 5, 5), "odd sizes")]
    for widths, sizes, what in cases:
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        head = randomize_batchnorm(UPerHead(widths, 4, 3)).eval()
        feats = [torch.randn(2, c, s, s, generator=gen) for c, s in zip(widths, sizes)]
        case = f"C2..C5 of widths {widths} and sizes {sizes} ({what})"
        with torch.no_grad():
            got = _run("laterals", answer, ([f.clone() for f in feats], head), case,
                       block=[UPerHead.fpn_features, UPerHead.forward])
            if not isinstance(got, (list, tuple)) or len(got) != 4:
                _fail(f"laterals: expected a list of 4 tensors for {case}, got {_describe(got)} (the PPM's "
                      f"output on C5 is the fourth, the top of the pyramid)")
            state = {k: v.detach() for k, v in head.state_dict().items()}
            expected = [_ref_conv_bn_relu(f, state, f"lateral_convs.{k}.") for k, f in enumerate(feats[:3])]
            expected.append(_ref_ppm(feats[3], {k[4:]: v for k, v in state.items() if k.startswith("ppm.")},
                                     head.ppm.pool_scales))
            for level, (g, e) in enumerate(zip(got, expected)):
                compare("laterals", g, e, f"level {level} of {case}", 1e-4, 1e-5)
    _passed("laterals", len(cases))


def _ref_weighted_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                     by_count: bool = False) -> torch.Tensor:
    valid = target != 255
    log_p = logits.double().log_softmax(1)
    picked, w = torch.zeros(target.shape, dtype=torch.float64), torch.zeros(target.shape, dtype=torch.float64)
    for k in range(logits.shape[1]):
        picked = torch.where(target == k, log_p[:, k], picked)
        w = torch.where(target == k, weights[k].double(), w)
    denom = valid.sum().double() if by_count else w.sum()
    return -(picked * w).sum() / denom if float(denom) > 0 else torch.tensor(0.0, dtype=torch.float64)


def check_weighted_cross_entropy(answer: typing.Callable[..., torch.Tensor]) -> None:
    """05: `answer(logits, target, weights)` = sum of w_y x CE / sum of w_y over non-255 pixels (0 if none)."""
    __tracebackhide__ = True
    from upernet_ref.training import losses

    gen = torch.Generator().manual_seed(23)
    cases = []
    for b, k, h, w in ((2, 4, 5, 6), (1, 3, 4, 4), (3, 5, 3, 7)):
        target = torch.randint(0, k, (b, h, w), generator=gen)
        target[torch.rand(b, h, w, generator=gen) < 0.25] = 255
        cases.append((torch.randn(b, k, h, w, generator=gen) * 2, target, torch.rand(k, generator=gen) * 4 + 0.1,
                      f"{b}x{k}x{h}x{w} logits, random class weights"))
    cases.append((torch.randn(2, 3, 4, 4, generator=gen), torch.full((2, 4, 4), 255), torch.tensor([1.0, 2.0, 3.0]),
                  "an all-ignored batch (expected 0, not NaN)"))
    for logits, target, weights, case in cases:
        got = _run("weighted_cross_entropy", answer, (logits, target, weights), case,
                   block=[losses.cross_entropy, losses.segmentation_loss],
                   hints=[("out of bounds", "255 was not removed: mask the ignored pixels before gathering")])
        expected = _ref_weighted_ce(logits, target, weights)
        if isinstance(got, torch.Tensor) and got.dim() == 0 and bool(torch.isnan(got)) and float(expected) == 0:
            _fail(f"weighted_cross_entropy: NaN for {case}: with no valid pixel the loss is 0")
        _check("weighted_cross_entropy", got, expected, case, [
            ("divided by the number of valid pixels: torch's weighted mean divides by the sum of their weights",
             lambda: _ref_weighted_ce(logits, target, weights, by_count=True)),
            ("the weights are missing", lambda: _ref_cross_entropy(logits, target))], 1e-5, 1e-6)
    _passed("weighted_cross_entropy", len(cases))


def _ref_multiscale_flip(model: nn.Module, image: torch.Tensor, scales, out_size, rounding=None,
                         average_logits: bool = False, flip_back: bool = True,
                         softmax_first: bool = False) -> torch.Tensor:
    rounding = rounding or (lambda v: math.floor(v + 0.5))
    h, w = image.shape[-2:]
    views = []
    for s in scales:
        size = (rounding(h * s), rounding(w * s))
        scaled = image if size == (h, w) else _resize(image, size)
        for mirrored in (False, True):
            logits = model(scaled.flip(-1) if mirrored else scaled)["out"]
            if mirrored and flip_back:
                logits = logits.flip(-1)
            if softmax_first:
                views.append(_resize(logits.softmax(1), out_size))
            else:
                logits = logits if tuple(logits.shape[-2:]) == tuple(out_size) else _resize(logits, out_size)
                views.append(logits if average_logits else logits.softmax(1))
    mean = torch.stack(views).mean(0)
    return mean.softmax(1) if average_logits else mean


def check_multiscale_flip(answer: typing.Callable[..., torch.Tensor]) -> None:
    """09: `answer(model, image, scales, out_size)` = softmax averaged over every scale and its mirror."""
    __tracebackhide__ = True
    from upernet_ref.evaluation import inference

    gen = torch.Generator().manual_seed(24)
    cases = []
    for h, w, scales, out_size in ((10, 14, (0.5, 1.0, 1.5), (10, 14)), (9, 13, (0.75, 1.25), (18, 26)),
                                   (12, 6, (1.0,), (12, 6)), (11, 15, (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), (11, 15))):
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        cases.append((_Logits(3).eval(), torch.randn(1, 3, h, w, generator=gen), scales, out_size,
                      f"a {h}x{w} image, scales {scales}, output {out_size}"))
    for model, image, scales, out_size, case in cases:
        with torch.no_grad():
            got = _run("multiscale_flip", answer, (model, image.clone(), scales, out_size), case,
                       block=[inference.inference, inference.whole_inference, inference._accumulate])
            expected = _ref_multiscale_flip(model, image, scales, out_size)
            _check("multiscale_flip", got, expected, case, [
                ("you averaged logits, not probabilities: softmax each view, then average",
                 lambda: _ref_multiscale_flip(model, image, scales, out_size, average_logits=True)),
                ("the mirror image was not flipped back before averaging",
                 lambda: _ref_multiscale_flip(model, image, scales, out_size, flip_back=False)),
                ("the scaled sizes were truncated: round h x s as int(h x s + 0.5), like mmsegmentation",
                 lambda: _ref_multiscale_flip(model, image, scales, out_size, rounding=int)),
                ("softmax before resizing: resize each view's logits to the output size, then softmax",
                 lambda: _ref_multiscale_flip(model, image, scales, out_size, softmax_first=True))], 1e-5, 1e-6)
    _passed("multiscale_flip", len(cases))


class _TwoHeads(nn.Module):
    """A tiny segmentation net shaped like the package's: `{"out"}`, plus `{"aux"}` while training.

    Its BatchNorm makes the mode matter (batch statistics, running averages updated in train
    mode), and its auxiliary head shares the trunk, so the aux weight changes every gradient.
    """

    def __init__(self, classes: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Conv2d(4, classes, 1)
        self.aux_classifier = nn.Conv2d(4, classes, 3, padding=1)

    def forward(self, x):
        features = self.trunk(x)
        result = {"out": self.classifier(features)}
        if self.training:  # as `UPerNet`: the auxiliary output exists only for the loss
            result["aux"] = self.aux_classifier(features)
        return result


def _step_outcome(model: nn.Module, buffers: typing.Sequence[torch.Tensor], loss) -> dict[str, torch.Tensor]:
    """What one training step leaves behind: its loss, every parameter, BN statistic and buffer."""
    loss = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    outcome = {"the loss": loss.double()}
    outcome.update({f"parameter {n}": p.detach().double().clone() for n, p in model.named_parameters()})
    outcome.update({f"BatchNorm {n}": b.detach().double().clone() for n, b in model.named_buffers()})
    outcome.update({f"momentum buffer of {n}": b.detach().double().clone()
                    for (n, _), b in zip(model.named_parameters(), buffers)})
    return outcome


def _flat(outcome: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in outcome.values()])


def _ref_training_steps(model: nn.Module, batches, buffers, start: int, tc, aux_weight: float | None = None,
                        decay: bool = True, zero_grad: bool = True, keep_buffers: bool = True,
                        poly: bool = True, lr_offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """The outcome of each recipe iteration from `start` on copies of `model` and `buffers`
    (and of the usual mistakes): train-mode forward, CE(out) + 0.4 x CE(aux), then
    d = g + wd p, b <- momentum b + d, p <- p - lr(it) b with the poly lr of the iteration."""
    model, buffers = copy.deepcopy(model).train(), [b.clone() for b in buffers]
    params = list(model.parameters())
    summed = [torch.zeros_like(p) for p in params]  # what .grad holds when zero_grad is forgotten
    aux_weight = tc.aux_loss_weight if aux_weight is None else aux_weight
    outcomes = []
    for k, (images, masks) in enumerate(batches):
        outputs = model(images)
        loss = _ref_cross_entropy(outputs["out"], masks) + aux_weight * _ref_cross_entropy(outputs["aux"], masks)
        grads = torch.autograd.grad(loss, params)
        it = start + k + lr_offset
        lr = _ref_poly_lr(it, tc.max_iters, tc.lr, tc.min_lr, tc.lr_power, tc.warmup_iters,
                          tc.warmup_ratio) if poly else tc.lr
        with torch.no_grad():
            for p, g, b, s in zip(params, grads, buffers, summed):
                s += g
                new_p, new_b = _ref_sgd(p, g if zero_grad else s, b, lr, tc.momentum,
                                        tc.weight_decay, no_decay=not decay)
                if keep_buffers:
                    b.copy_(new_b)
                p.copy_(new_p)
        outcomes.append(_step_outcome(model, buffers, loss))
    return outcomes


def _training_step_cases() -> list[tuple]:
    """(model, batches, buffers, start, train config, what): seeded; edge cases included."""
    from upernet_ref.configs import TrainConfig

    gen = torch.Generator().manual_seed(25)

    def batch(b, classes, h, w, ignored=0.2):
        masks = torch.randint(0, classes, (b, h, w), generator=gen)
        masks[torch.rand(b, h, w, generator=gen) < ignored] = 255
        return torch.randn(b, 3, h, w, generator=gen, dtype=torch.float64), masks

    def model(classes):
        torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
        return randomize_batchnorm(_TwoHeads(classes)).double().eval()  # handed over in eval mode

    def zeros(m):
        return [torch.zeros_like(p) for p in m.parameters()]

    recipe = TrainConfig(epochs=1, iters_per_epoch=6)  # the published lr, momentum, weight decay
    m1, m2, m3 = model(3), model(4), model(5)
    resumed = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 for p in m2.parameters()]
    strong = TrainConfig(epochs=2, iters_per_epoch=4, lr=0.1, momentum=0.5, weight_decay=0.01, lr_power=1.0,
                         min_lr=0.0)
    return [
        (m1, [batch(2, 3, 8, 8) for _ in range(3)], zeros(m1), 0, recipe,
         "the first 3 iterations of a 6-iteration run with the published recipe, buffers starting at zero"),
        (m2, [batch(2, 4, 6, 7) for _ in range(3)], resumed, 5, strong,
         "iterations 5-7 (the last) of an 8-iteration run resumed with momentum buffers from before, "
         "lr 0.1, momentum 0.5, weight decay 0.01, power 1"),
        (m3, [batch(2, 5, 5, 6), batch(2, 5, 5, 6, ignored=1.0), batch(2, 5, 5, 6)], zeros(m3), 2, recipe,
         "iterations 2-4 of a 6-iteration run whose second batch is all ignored (loss 0: the update "
         "is momentum and weight decay only)")]


def check_training_step(answer: typing.Callable[..., typing.Any]) -> None:
    """08: `answer(model, images, masks, buffers, iteration, train_cfg)` = one recipe iteration.

    In place: the model's parameters take one SGD step (momentum, weight decay, the poly lr of
    `iteration`) and `buffers` (one momentum buffer a parameter) are updated; it returns the loss.
    Each case runs a few consecutive iterations, so the state a step leaves (gradients, buffers,
    BatchNorm statistics) is checked too.
    """
    __tracebackhide__ = True
    from upernet_ref.training import losses, trainer

    block = [trainer.train_step, losses.segmentation_loss, losses.cross_entropy, torch.optim.SGD.step]
    hints = [("'aux'", "the model is in eval mode, where it gives no 'aux': call model.train() first "
                       "(BatchNorm then normalises with the batch's statistics)"),
             ("leaf Variable", "update the parameters in place inside `with torch.no_grad():`")]
    cases = _training_step_cases()
    for model, batches, buffers, start, tc, what in cases:
        pristine, variants = copy.deepcopy(model), {}

        def wrong(name, **options):  # a mistake's outcomes, computed once when needed
            def outcome(k, name=name, options=options, pristine=pristine, batches=batches, buffers=buffers,
                        start=start, tc=tc):
                if name not in variants:
                    variants[name] = _ref_training_steps(pristine, batches, buffers, start, tc, **options)
                return variants[name][k]
            return outcome

        expected = _ref_training_steps(pristine, batches, buffers, start, tc)
        mistakes = [
            ("the auxiliary loss is missing: loss = CE(out) + 0.4 x CE(aux)", wrong("no aux", aux_weight=0.0)),
            ("the auxiliary loss has weight 1: the recipe weighs it 0.4", wrong("aux 1", aux_weight=1.0)),
            ("the weight decay is missing: d = g + weight_decay x p", wrong("no decay", decay=False)),
            ("the gradients accumulate from step to step: zero them before each backward "
             "(model.zero_grad(), or torch.autograd.grad)", wrong("no zero_grad", zero_grad=False)),
            ("the momentum buffers were not kept: update `buffers` in place (b.mul_(momentum).add_(d)), "
             "the next step continues from them", wrong("buffers", keep_buffers=False)),
            ("the lr is the base lr at every step: use the poly lr of this iteration",
             wrong("base lr", poly=False)),
            ("the lr of the next iteration: iteration `it` uses lr(it) (the scheduler steps after the "
             "update)", wrong("next lr", lr_offset=1))]
        work = [b.clone() for b in buffers]
        for k, (images, masks) in enumerate(batches):
            case = f"step {k + 1} of {what}"
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            got = _run("training_step", answer, (model, images.clone(), masks.clone(), work, start + k, tc),
                       case, block=block, hints=hints)
            _check_training_outcome(got, model, work, before, expected[k], [(m, lambda f=f, k=k: f(k)) for m, f in mistakes],
                                    case)
    _passed("training_step", len(cases))


def _check_training_outcome(got, model, buffers, before: dict, expected: dict, mistakes, case: str) -> None:
    """One step's outcome against the reference: a named mistake, or the first thing that differs."""
    __tracebackhide__ = True
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.detach().reshape(())
    elif not isinstance(got, (int, float)) or isinstance(got, bool):
        _fail(f"training_step: expected the loss (a number or a 0-d tensor) for {case}, got {_describe(got)}")
    if len(buffers) != len(list(model.parameters())):
        _fail(f"training_step: {len(buffers)} momentum buffers for {case}, expected one a parameter")
    outcome = _step_outcome(model, buffers, got)
    if bool(torch.isnan(outcome["the loss"])) and float(expected["the loss"]) == 0:
        _fail(f"training_step: a NaN loss for {case}: with no valid pixel each cross-entropy is 0 "
              f"(divide by max(1, the number of valid pixels))")
    rtol, atol = 1e-5, 1e-8  # the cases run in float64; this leaves room for an answer in float32
    if _matches(_flat(outcome), _flat(expected), rtol, atol):
        return
    for message, variant in mistakes:
        value = _flat(variant())
        if not _matches(value, _flat(expected), rtol, atol) and _matches(_flat(outcome), value, rtol, atol):
            _fail(f"training_step: {message} (for {case})")
    if all(torch.equal(p.detach().double(), before[n]) for n, p in model.named_parameters()):
        _fail(f"training_step: the parameters did not change for {case}: update them in place "
              f"(p -= lr * b, or p.sub_(lr * b), under torch.no_grad()); `p = p - ...` binds a new tensor "
              f"that the model never sees")
    for name, value in expected.items():
        compare(f"training_step ({name})", outcome[name], value, case, rtol, atol)


def _ref_lr_curve(tc, start: int, per_epoch: bool = False, offset: int = 0, stop_extra: int = 0,
                  warmup: bool = True, restart: bool = False) -> torch.Tensor:
    """The lr of each iteration start .. max_iters - 1 of the run `tc` describes (and the mistakes)."""
    total = tc.max_iters - start if restart else tc.max_iters
    first = 0 if restart else start
    values = []
    for it in range(first, first + tc.max_iters - start + stop_extra):
        at = (it // tc.iters_per_epoch) * tc.iters_per_epoch if per_epoch else it + offset
        values.append(_ref_poly_lr(at, total, tc.lr, tc.min_lr, tc.lr_power,
                                   tc.warmup_iters if warmup else 0, tc.warmup_ratio))
    return torch.tensor(values, dtype=torch.float64)


def _lr_curve_cases() -> list[tuple]:
    """(train config, start, what): small runs with and without warmup, resumed ones, two recipes."""
    from upernet_ref.configs import TrainConfig, get_config

    rng = random.Random(26)
    warm = TrainConfig(epochs=3, iters_per_epoch=40, warmup_iters=30, warmup_ratio=0.1)
    cases = [(TrainConfig(epochs=4, iters_per_epoch=25), 0, "a 100-iteration run from the start"),
             (warm, 0, "a 120-iteration run with a 30-iteration linear warmup from ratio 0.1"),
             (warm, 70, "the same run resumed at iteration 70, after the warmup"),
             (warm, 10, "the same run resumed at iteration 10, inside the warmup"),
             (warm, 119, "the same run resumed at its last iteration"),
             (get_config("upernet_r50_os8_voc").train, 0, "the published VOC recipe (60 epochs x 661)"),
             (get_config("upernet_r50_os8_ade20k").train, 160_000, "the published ADE20K recipe resumed at 160,000")]
    for _ in range(3):
        epochs, per_epoch = rng.randint(1, 6), rng.randint(5, 60)
        tc = TrainConfig(epochs=epochs, iters_per_epoch=per_epoch, lr=rng.choice((0.01, 0.02, 0.1)),
                         min_lr=rng.choice((0.0, 1e-4)), lr_power=rng.choice((0.9, 1.0, 2.0)),
                         warmup_iters=rng.choice((0, rng.randint(1, epochs * per_epoch - 1))),
                         warmup_ratio=rng.choice((1e-6, 0.1, 0.5)))
        cases.append((tc, rng.randint(0, tc.max_iters - 1), "a random run, resumed at a random iteration"))
    return cases


def check_lr_curve(answer: typing.Callable[..., typing.Sequence[float]]) -> None:
    """06: `answer(train_cfg, start)` = the lr the optimiser uses at each iteration start .. max_iters - 1."""
    __tracebackhide__ = True
    from upernet_ref.training import schedule

    cases = _lr_curve_cases()
    for tc, start, what in cases:
        case = (f"{what} (epochs={tc.epochs}, iters_per_epoch={tc.iters_per_epoch}, lr={tc.lr}, "
                f"min_lr={tc.min_lr}, lr_power={tc.lr_power}, warmup_iters={tc.warmup_iters}, "
                f"warmup_ratio={tc.warmup_ratio}, start={start})")
        got = _run("lr_curve", answer, (tc, start), case,
                   block=[schedule.poly_lr, schedule.PolyLR.get_lr, schedule.epochs_to_iters])
        if isinstance(got, (list, tuple)) and any(isinstance(v, complex) for v in got):
            _fail(f"lr_curve: complex learning rates for {case}: an iteration went past max_iters, where "
                  f"1 - it / max_iters is negative")
        if isinstance(got, torch.Tensor):
            got = got.detach().double().flatten()
        elif isinstance(got, (list, tuple, range)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in got):
            got = torch.tensor([float(v) for v in got], dtype=torch.float64)
        else:
            _fail(f"lr_curve: expected a list of learning rates for {case}, got {_describe(got)}")
        _check("lr_curve", got, _ref_lr_curve(tc, start), case, [
            ("stepped once per epoch: the poly lr changes every iteration (PolyLR steps after each update)",
             lambda: _ref_lr_curve(tc, start, per_epoch=True)),
            ("one iteration late: iteration it uses lr(it), so the first value is lr(start)",
             lambda: _ref_lr_curve(tc, start, offset=1)),
            ("one value too many: the run's last iteration is max_iters - 1 (lr(max_iters) is never used)",
             lambda: _ref_lr_curve(tc, start, stop_extra=1)),
            ("a new schedule from the resume point: the lr is a function of the run's iteration alone, so a "
             "run resumed at `start` continues on the same curve (lr(start), ..., not a fresh warmup and poly "
             "over max_iters - start)", lambda: _ref_lr_curve(tc, start, restart=True)),
            ("the warmup is missing: during the config's first warmup_iters iterations scale the lr from "
             "warmup_ratio up to 1", lambda: _ref_lr_curve(tc, start, warmup=False)),
            ("the values start at iteration 0: return those of iterations start .. max_iters - 1",
             lambda: _ref_lr_curve(tc, 0))], 1e-9, 1e-12)
    _passed("lr_curve", len(cases))
