"""Export to ONNX (checked with onnxruntime at two sizes) and to `torch.export`
(`upernet export`).

    upernet export --config upernet_r50_os8_ade20k --checkpoint ckpt.pth \\
        --format onnx --size 512x512 --out upernet.onnx

The ONNX graph takes any batch, height and width (`images`: (B, 3, H, W), normalised RGB) and
returns the logits `(B, num_classes, H, W)` of the eval-mode model (no auxiliary head); its
metadata holds the class names, the normalisation and the configuration's name. `torch.export`
is at a static shape.

The one piece that needs care is the PPM's adaptive average pooling (ppm.py). PyTorch's
adaptive pooling splits an h x w map into s x s bins with bin i covering rows
[floor(i h / s), ceil((i + 1) h / s)); the bins overlap or differ in size when s does not divide
h. ONNX has no adaptive pooling: the TorchScript exporter writes GlobalAveragePool for s = 1 and
an AveragePool only when s divides h and w, and fails otherwise (e.g. the 3x3 and 6x6 bins of
a 8x12 C5 map, i.e. a 64x96 input at output stride 8). `TracedPyramidPooling` computes the same
bins exactly as two matrix products, pooled = P_h x P_w^T, with P[i, y] = 1 / |bin i| for the
rows y of bin i, and builds P from the feature map's size with tensor ops (arange, floor
division), so the exported graph computes it for whatever size it is given.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from upernet_ref.model.layers import resize
from upernet_ref.model.ppm import PyramidPooling
from upernet_ref.extras import require


def adaptive_pool_matrix(in_size: int | torch.Tensor, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix whose rows average PyTorch's adaptive pooling bins (1-D).

    Tensor ops only, so that under ONNX tracing `in_size` (a traced size) stays dynamic.
    """
    i = torch.arange(out_size)
    start = torch.div(i * in_size, out_size, rounding_mode="floor")
    end = torch.div((i + 1) * in_size + (out_size - 1), out_size, rounding_mode="floor")  # ceil
    pos = torch.arange(in_size)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.float() / (end - start)[:, None].float()


class TracedPyramidPooling(nn.Module):
    """`PyramidPooling` with the adaptive pools written as matrix products built from the
    input's size (exportable to ONNX at any size). Shares the branches and bottleneck of the
    module it replaces, so the weights (and their names) are unchanged."""

    def __init__(self, ppm: PyramidPooling):
        super().__init__()
        self.pool_scales, self.branches, self.bottleneck = ppm.pool_scales, ppm.branches, ppm.bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [x]
        for scale, branch in zip(self.pool_scales, self.branches):
            p_h = adaptive_pool_matrix(h, scale).to(x)  # (s, h)
            p_w = adaptive_pool_matrix(w, scale).to(x)  # (s, w)
            pooled = p_h @ x @ p_w.t()  # (B, C, s, s)
            outs.append(resize(branch(pooled), (h, w)))
        return self.bottleneck(torch.cat(outs, dim=1))


class LogitsOnly(nn.Module):
    """Wraps the model so that the exported graph has one tensor output, the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


def exportable_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` for ONNX: every PPM traced-size, the logits as output."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, PyramidPooling):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, TracedPyramidPooling(module))
    return LogitsOnly(model).eval()


def check_size(model: nn.Module, size: tuple[int, int]) -> None:
    """A ValueError unless `model` runs on a (1, 3, *size) input (tried on the meta device)."""
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"export: size must be two positive integers (H, W), got {size!r}")
    try:
        with torch.no_grad():
            copy.deepcopy(model).to("meta").eval()(torch.zeros(1, 3, *size, device="meta"))
    except RuntimeError as err:
        raise ValueError(f"export: the model cannot run on a {size[0]}x{size[1]} input: {err}") from None


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs logit difference and the fraction of pixels with the same argmax."""
    return {"max_abs_diff": float(np.abs(reference - candidate).max()),
            "argmax_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean())}


def second_size(size: tuple[int, int]) -> tuple[int, int]:
    """Another input size for the dynamic-shape check: about 3/4 of the height and 5/4 of the
    width, made odd, so the C5 map (and its PPM bins) differs from the first size's."""
    return (max(33, size[0] * 3 // 4) | 1, max(33, size[1] * 5 // 4) | 1)


def export_onnx(model: nn.Module, size: tuple[int, int], out: str | Path, batch: int = 1,
                opset: int = 17, check: bool = True,
                metadata: dict[str, str] | None = None) -> dict[str, float | str]:
    """Write `model` as ONNX with dynamic batch, height and width; check it with onnxruntime.

    Traced at (batch, 3, *size). Uses the TorchScript-based exporter (`dynamo=False`): the
    dynamo exporter needs `onnxscript`, which this project does not depend on. `metadata`: ONNX
    metadata_props (e.g. classes, mean, std). With `check`, returns onnxruntime vs PyTorch on
    seeded random inputs at `size` and at `second_size(size)` (batch 2 there).
    """
    onnx = require("onnx", "export", "the ONNX export")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_size(model, size)
    wrapped = exportable_model(model)
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "legacy TorchScript-based export", tracer notes
        torch.onnx.export(wrapped, (x,), str(out), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": axes, "logits": axes}, do_constant_folding=True)
    graph = onnx.load(str(out))
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(out))
    report: dict[str, float | str] = {"path": str(out), "format": "onnx", "opset": opset,
                                      "dynamic": "batch, height, width"}
    if check:
        ort = require("onnxruntime", "export", "the ONNX check")
        onnx.checker.check_model(str(out))
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        eager_model = LogitsOnly(copy.deepcopy(model).eval())
        other = second_size(size)
        for tag, (n, hw) in (("", (batch, size)), (f"{other[0]}x{other[1]}_", (2, other))):
            check_size(model, hw)
            xi = torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(1)).to(device)
            with torch.no_grad():
                eager = eager_model(xi).cpu().numpy()
            onnx_out = session.run(["logits"], {"images": xi.cpu().numpy()})[0]
            report.update({f"onnx_vs_eager_{tag}{k}": v for k, v in compare(eager, onnx_out).items()})
    return report


def export_torch(model: nn.Module, size: tuple[int, int], out: str | Path, batch: int = 1,
                 check: bool = True) -> dict[str, float | str]:
    """`torch.export.export` of the eval-mode model (static shape), saved with torch.export.save.

    torch.export keeps `adaptive_avg_pool2d` as an ATen op, so the model needs no change.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapped = LogitsOnly(copy.deepcopy(model).eval())
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device)
    program = torch.export.export(wrapped, (x,))
    torch.export.save(program, str(out))
    report: dict[str, float | str] = {"path": str(out), "format": "torch-export"}
    if check:
        loaded = torch.export.load(str(out)).module()
        with torch.no_grad():
            eager = wrapped(x).cpu().numpy()
            exported = loaded(x).cpu().numpy()
        report.update({f"export_vs_eager_{k}": v for k, v in compare(eager, exported).items()})
    return report
