"""Export to ONNX (checked with onnxruntime) and to `torch.export` (`upernet export`).

    upernet export --config upernet_r50_os8_ade20k --checkpoint ckpt.pth \\
        --format onnx --size 512x512 --out upernet.onnx

Both exports are at a static input shape (batch 1 by default) and return the logits
`(B, num_classes, H, W)` of the eval-mode model (no auxiliary head).

The one piece that needs care is the PPM's adaptive average pooling (ppm.py). PyTorch's
adaptive pooling splits an h x w map into s x s bins with bin i covering rows
[floor(i h / s), ceil((i + 1) h / s)); the bins overlap or differ in size when s does not divide
h. ONNX has no adaptive pooling: the TorchScript exporter writes GlobalAveragePool for s = 1 and
an AveragePool only when s divides h and w, and fails otherwise (e.g. the 3x3 and 6x6 bins of
a 8x12 C5 map, i.e. a 64x96 input at output stride 8). `StaticPyramidPooling` computes the
same bins exactly for the static size as one matrix product: pooled = x.flatten(2) @ P^T with
P[(i, j), (y, x)] = 1 / |bin (i, j)| for the pixels of bin (i, j). Any input size that the
eager model accepts can therefore be exported; what is not supported is a dynamic input shape
(the pooling matrices, and the resize sizes, are fixed at export time).
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from upernet_ref.model.layers import resize
from upernet_ref.model.ppm import PyramidPooling
from upernet_ref.errors import require


def adaptive_pool_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix whose rows average PyTorch's adaptive pooling bins (1-D)."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = math.ceil((i + 1) * in_size / out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


class StaticPyramidPooling(nn.Module):
    """`PyramidPooling` with the adaptive pools written as matrix products for one C5 size.

    Shares the branches and bottleneck of the module it replaces, so the weights (and their
    names) are unchanged.
    """

    def __init__(self, ppm: PyramidPooling, feature_size: tuple[int, int]):
        super().__init__()
        self.pool_scales = ppm.pool_scales
        self.branches = ppm.branches
        self.bottleneck = ppm.bottleneck
        self.feature_size = tuple(feature_size)
        h, w = self.feature_size
        device = next(ppm.parameters()).device
        for k, s in enumerate(self.pool_scales):
            # 2-D bins are products of 1-D bins: P = kron(P_h, P_w), shape (s*s, h*w).
            p = torch.kron(adaptive_pool_matrix(h, s), adaptive_pool_matrix(w, s))
            self.register_buffer(f"pool_matrix{k}", p.float().to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if not torch.jit.is_tracing() and (h, w) != self.feature_size:
            raise ValueError(f"StaticPyramidPooling was built for a {self.feature_size} feature "
                             f"map, got {(h, w)}")
        outs = [x]
        flat = x.flatten(2)  # (B, C, h*w)
        for k, (scale, branch) in enumerate(zip(self.pool_scales, self.branches)):
            p = getattr(self, f"pool_matrix{k}")  # (s*s, h*w)
            pooled = torch.matmul(flat, p.t()).reshape(b, c, scale, scale)  # (B, C, s, s)
            outs.append(resize(branch(pooled), (h, w)))
        return self.bottleneck(torch.cat(outs, dim=1))


class LogitsOnly(nn.Module):
    """Wraps the model so that the exported graph has one tensor output, the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


def ppm_input_sizes(model: nn.Module, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The C5 size each PyramidPooling sees for an input of `size`, found on the meta device."""
    sizes: dict[str, tuple[int, int]] = {}
    meta = copy.deepcopy(model).to("meta").eval()
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, m in meta.named_modules() if isinstance(m, PyramidPooling)]
    try:
        with torch.no_grad():
            meta(torch.zeros(1, 3, *size, device="meta"))
    except RuntimeError as err:
        raise ValueError(f"export: the model cannot run on a {size[0]}x{size[1]} input: {err}") from None
    finally:
        for h in hooks:
            h.remove()
    return sizes


def exportable_model(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """An eval-mode copy of `model` for a static input `size`: PPMs made static, logits out."""
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"export: size must be two positive integers (H, W), got {size!r}")
    sizes = ppm_input_sizes(model, size)
    model = copy.deepcopy(model).eval()
    for name, feature_size in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticPyramidPooling(parent.get_submodule(child), feature_size))
    return LogitsOnly(model).eval()


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs logit difference and the fraction of pixels with the same argmax."""
    return {"max_abs_diff": float(np.abs(reference - candidate).max()),
            "argmax_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean())}


def export_onnx(model: nn.Module, size: tuple[int, int], out: str | Path, batch: int = 1,
                opset: int = 17, check: bool = True) -> dict[str, float | str]:
    """Write `model` as ONNX for a static (batch, 3, H, W) input; check it with onnxruntime.

    Uses the TorchScript-based exporter (`dynamo=False`): the dynamo exporter needs
    `onnxscript`, which this project does not depend on. Returns the comparison on a seeded
    random input (and the eager-vs-static-PPM difference in PyTorch) when `check`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapped = exportable_model(model, size)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
        torch.onnx.export(wrapped, (x,), str(out), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          do_constant_folding=True)
    report: dict[str, float | str] = {"path": str(out), "format": "onnx", "opset": opset}
    if check:
        onnx = require("onnx", "export", "the ONNX check")
        ort = require("onnxruntime", "export", "the ONNX check")

        onnx.checker.check_model(str(out))
        with torch.no_grad():
            eager = LogitsOnly(copy.deepcopy(model).eval())(x).cpu().numpy()
            static = wrapped(x).cpu().numpy()
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        onnx_out = session.run(["logits"], {"images": x.cpu().numpy()})[0]
        report.update({f"onnx_vs_eager_{k}": v for k, v in compare(eager, onnx_out).items()})
        report.update({f"static_ppm_vs_eager_{k}": v for k, v in compare(eager, static).items()})
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
