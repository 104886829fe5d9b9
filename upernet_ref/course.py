"""What the notebooks (`notebooks/`, the course) need from the package, in one place.

- `check_*(answer)`: each exercise's checker. A student writes a function in a notebook cell;
  the checker runs it on a few fixed cases against the package's own implementation (the
  reference) and either prints what passed or raises `ExerciseError` saying, in words, what is
  wrong (type, shape, dtype, or which values differ and by how much).
- `pick_device()` and `exact_comparisons()`: the same cells on a CPU and on a GPU. cuDNN and
  cuBLAS use TF32 for float32 convolutions and matrix products on Ampere and later GPUs
  (10-bit mantissa), which makes a hand-built network differ from the package's by ~1e-3, far
  above `assert_close`'s float32 tolerances; comparisons therefore switch TF32 off.
- `output_shapes(model, x, names)` and `draw_diagram(ax, boxes, arrows)`: the architecture
  pictures, drawn from the model itself (shapes recorded by forward hooks, on the `meta` device).
- `load_demo_checkpoint(model)`: the course's trained `upernet_small_demo` weights
  (`notebooks/assets/upernet_small_demo.safetensors`, made by
  `notebooks/assets/make_demo_checkpoint.py`), verified by SHA-256 before loading; safetensors
  holds only tensors, so loading it cannot run code.
"""
from __future__ import annotations

import hashlib
import typing
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "notebooks" / "assets"
DEMO_CHECKPOINT = ASSETS / "upernet_small_demo.safetensors"
DEMO_CHECKPOINT_SHA256 = "d82da1e51840648dccb532a7e3a764beb124862c4f99f57d8f915a28717e8b39"


class ExerciseError(AssertionError):
    """An exercise's answer differs from the reference; the message says how."""


# --------------------------------------------------------------------------------------------
# The same cells on a CPU and a GPU

def pick_device() -> torch.device:
    """CUDA when there is a GPU, the CPU otherwise (every notebook's first cell; the trainer's rule)."""
    from upernet_ref.collectives import resolve_device

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
# Comparing an answer with the reference, in words

def _describe(x: typing.Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:80]


def compare(name: str, got: typing.Any, expected: typing.Any, case: str = "",
            rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Raise `ExerciseError` saying how `got` differs from `expected` (tensors or numbers)."""
    where = f" for {case}" if case else ""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise ExerciseError(f"{name}: expected {_describe(expected)}{where}, got {_describe(got)}")
        if tuple(got.shape) != tuple(expected.shape):
            raise ExerciseError(f"{name}: shape {tuple(got.shape)}{where}, expected "
                                f"{tuple(expected.shape)}")
        if got.dtype.is_floating_point != expected.dtype.is_floating_point:
            raise ExerciseError(f"{name}: dtype {got.dtype}{where}, expected {expected.dtype}")
        got_f, exp_f = got.detach().double().cpu(), expected.detach().double().cpu()
        bad = ~torch.isclose(got_f, exp_f, rtol=rtol, atol=atol, equal_nan=True)
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ExerciseError(
                f"{name}: {int(bad.sum())} of {bad.numel()} values differ{where}; first at index "
                f"{index}: {got_f[index].item():.6g} instead of {exp_f[index].item():.6g} "
                f"(largest difference {(got_f - exp_f).abs().max().item():.3g})")
        return
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        raise ExerciseError(f"{name}: expected a number{where}, got {_describe(got)}")
    if abs(got - expected) > atol + rtol * abs(expected):
        raise ExerciseError(f"{name}: {got!r}{where}, expected {expected!r}")


def _passed(name: str, cases: int) -> None:
    print(f"{name}: correct ({cases} case{'s' if cases > 1 else ''} checked against the package)")


# --------------------------------------------------------------------------------------------
# The exercises, one checker each (notebook number in the name's docstring)

def check_conv_output_size(answer: typing.Callable[..., int]) -> None:
    """01: `answer(size, kernel, stride, padding, dilation)` = a conv's output length."""
    cases = [(64, 3, 1, 1, 1), (64, 3, 2, 1, 1), (64, 3, 1, 2, 2), (65, 3, 2, 1, 1),
             (64, 7, 2, 3, 1), (33, 3, 1, 4, 4), (10, 1, 2, 0, 1), (64, 3, 1, 1, 2)]
    for size, kernel, stride, padding, dilation in cases:
        conv = nn.Conv2d(1, 1, kernel, stride, padding, dilation)
        expected = conv(torch.zeros(1, 1, size, size)).shape[-1]
        compare("conv_output_size", answer(size, kernel, stride, padding, dilation), expected,
                f"size={size}, kernel={kernel}, stride={stride}, padding={padding}, "
                f"dilation={dilation}", rtol=0, atol=0)
    _passed("conv_output_size", len(cases))


def check_ppm(answer: typing.Callable[[torch.Tensor, nn.Module], torch.Tensor]) -> None:
    """02: `answer(x, ppm)` = `ppm(x)`, written with the PPM's own layers."""
    from upernet_ref.model.ppm import PyramidPooling
    from upernet_ref.model.upernet import randomize_batchnorm

    torch.manual_seed(0)
    ppm = randomize_batchnorm(PyramidPooling(8, 4, (1, 2, 3, 6))).eval()
    for h, w in ((12, 12), (9, 13)):
        x = torch.randn(2, 8, h, w)
        with torch.no_grad():
            compare("ppm", answer(x, ppm), ppm(x), f"x of shape {tuple(x.shape)}", 1e-4, 1e-5)
    _passed("ppm", 2)


def check_top_down(answer: typing.Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
    """03: `answer(laterals)` = the top-down pathway (each level + the upsampled coarser sum)."""
    from upernet_ref.model.layers import resize

    torch.manual_seed(0)
    laterals = [torch.randn(1, 4, 32 // 2 ** k, 32 // 2 ** k) for k in range(3)] + [torch.randn(1, 4, 4, 4)]
    expected = [t.clone() for t in laterals]
    for i in range(len(expected) - 1, 0, -1):
        expected[i - 1] = expected[i - 1] + resize(expected[i], expected[i - 1].shape[-2:])
    got = answer([t.clone() for t in laterals])
    if not isinstance(got, (list, tuple)) or len(got) != 4:
        raise ExerciseError(f"top_down: expected a list of 4 tensors, got {_describe(got)}")
    for level, (g, e) in enumerate(zip(got, expected)):
        compare("top_down", g, e, f"level {level} (1/{4 * 2 ** level} of the input)", 1e-4, 1e-5)
    _passed("top_down", 4)


def check_rescale_size(answer: typing.Callable[[int, int, tuple[float, float]], tuple[int, int]]) -> None:
    """04: `answer(height, width, (long, short))` = the size after fitting into the scale."""
    from upernet_ref.data.transforms import rescale_size

    cases = [(512, 683, (2048, 512)), (1024, 2048, (2048, 1024)), (375, 500, (2048, 512)),
             (96, 128, (128, 96)), (500, 333, (1024, 256)), (512, 683, (1024.5, 256.25))]
    for h, w, scale in cases:
        got = answer(h, w, scale)
        expected = rescale_size(h, w, scale)
        if tuple(got) != expected:
            raise ExerciseError(f"rescale_size: {tuple(got)} for a {h}x{w} image into {scale}, "
                                f"expected {expected} (factor min(long/long side, short/short "
                                f"side); round as int(x + 0.5))")
    _passed("rescale_size", len(cases))


def check_cross_entropy(answer: typing.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """05: `answer(logits, target)` = mean CE over the pixels whose label is not 255."""
    from upernet_ref.training.losses import cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, :3] = 255
    compare("cross_entropy", answer(logits, target), cross_entropy(logits, target),
            "a batch with ignored pixels", 1e-5, 1e-6)
    all_ignored = torch.full((2, 6, 7), 255)
    got = answer(logits, all_ignored)
    compare("cross_entropy", got, cross_entropy(logits, all_ignored),
            "a batch where every pixel is ignored (expected 0, not NaN)", 1e-5, 1e-6)
    _passed("cross_entropy", 2)


def check_poly_lr(answer: typing.Callable[..., float]) -> None:
    """06: `answer(iteration, max_iters, base_lr, min_lr, power, warmup_iters, warmup_ratio)`."""
    from upernet_ref.training.schedule import poly_lr

    cases = [(0, 1000, 0.01, 1e-4, 0.9, 0, 0.1), (500, 1000, 0.01, 1e-4, 0.9, 0, 0.1),
             (1000, 1000, 0.01, 1e-4, 0.9, 0, 0.1), (999, 1000, 0.01, 0.0, 1.0, 0, 0.1),
             (0, 1000, 0.01, 1e-4, 0.9, 100, 0.1), (50, 1000, 0.01, 1e-4, 0.9, 100, 0.1),
             (100, 1000, 0.01, 1e-4, 0.9, 100, 0.1), (1200, 1000, 0.01, 1e-4, 0.9, 0, 0.1)]
    for case in cases:
        names = "iteration, max_iters, base_lr, min_lr, power, warmup_iters, warmup_ratio".split(", ")
        compare("poly_lr", answer(*case), poly_lr(*case),
                ", ".join(f"{n}={v}" for n, v in zip(names, case)), 1e-9, 1e-12)
    _passed("poly_lr", len(cases))


def check_confusion_matrix(answer: typing.Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> None:
    """07: `answer(pred, target, num_classes)` = the (C, C) matrix, rows = truth, 255 skipped."""
    from upernet_ref.evaluation.metrics import confusion_matrix

    torch.manual_seed(0)
    pred = torch.randint(0, 4, (3, 5, 6))
    target = torch.randint(0, 4, (3, 5, 6))
    target[:, 0] = 255
    got = answer(pred, target, 4)
    expected = confusion_matrix(pred, target, 4)
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got.long(), expected.T):
        raise ExerciseError("confusion_matrix: rows and columns are swapped (row = ground truth, "
                            "column = prediction)")
    compare("confusion_matrix", got, expected, "3 random 5x6 maps, 4 classes, row 0 ignored", 0, 0)
    _passed("confusion_matrix", 1)


def check_iou(answer: typing.Callable[[torch.Tensor], torch.Tensor]) -> None:
    """07: `answer(matrix)` = per-class IoU (NaN for a class absent from truth and prediction)."""
    from upernet_ref.evaluation.metrics import summarize

    matrix = torch.tensor([[50, 2, 3, 0], [4, 30, 0, 0], [1, 0, 10, 0], [0, 0, 0, 0]])
    expected = torch.as_tensor(summarize(matrix)["iou"], dtype=torch.float64)
    compare("iou", torch.as_tensor(answer(matrix), dtype=torch.float64), expected,
            "a 4-class matrix whose class 3 never occurs", 1e-6, 1e-9)
    _passed("iou", 1)


def check_segmentation_loss(answer: typing.Callable[[dict, torch.Tensor], torch.Tensor]) -> None:
    """08: `answer(outputs, target)` = the published loss: CE(out) + 0.4 x CE(aux)."""
    from upernet_ref.configs import TrainConfig
    from upernet_ref.training.losses import segmentation_loss

    torch.manual_seed(0)
    outputs = {"out": torch.randn(2, 3, 8, 8), "aux": torch.randn(2, 3, 8, 8)}
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :2] = 255
    expected, _ = segmentation_loss(outputs, target, TrainConfig())
    compare("segmentation_loss", answer(outputs, target), expected, "2 images, 3 classes", 1e-5, 1e-6)
    _passed("segmentation_loss", 1)


def check_flip_inference(answer: typing.Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """09: `answer(model, image)` = softmax averaged over the image and its mirror (flipped back)."""
    from upernet_ref.configs import TestConfig
    from upernet_ref.evaluation.inference import inference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1)).eval()

    class Wrapped(nn.Module):  # the package's models return {"out": logits}
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"out": self.net(x)}

    wrapped = Wrapped().eval()
    image = torch.randn(1, 3, 10, 14)
    with torch.no_grad():
        expected = inference(wrapped, image, TestConfig(mode="whole", flip=True))
        got = answer(wrapped, image)
    compare("flip_inference", got, expected, "a 10x14 image", 1e-5, 1e-6)
    _passed("flip_inference", 1)
