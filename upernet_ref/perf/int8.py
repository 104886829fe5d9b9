"""The int8 inference path: post-training quantization through PyTorch's PT2E flow and
inductor's x86 int8 kernels (`upernet bench --int8`).

    q = int8_inference_model(model, calibration_images)   # a few images of the dataset
    q(images)["out"]                                       # float32 logits, like the model

How (torchao's `quantization.pt2e`, the home of PT2E since torch 2.10 dropped
`torch.ao.quantization.quantize_pt2e`; pinned as torchao==0.18.0 for torch 2.14.1):

1. BatchNorm folded into the convolutions (`fast.fold_batchnorm`, as for `--fast`);
2. `torch.export` at the input shape (strict: the source-module partitions that the quantizer
   matches, e.g. conv -> add -> ReLU, need dynamo's per-call names; a `Bottleneck` calls one
   ReLU module three times);
3. `X86InductorQuantizer` with its default configuration: int8 weights per output channel
   (symmetric), int8 activations per tensor (affine), on the convolutions and the ops fused with
   them; the ops it has no int8 pattern for (bilinear resize, adaptive pooling) stay float32;
4. calibration: the observers see the activations of the calibration images;
5. `convert_pt2e`, then `torch.compile` with freezing, which lowers the quantize / dequantize
   patterns to oneDNN int8 convolutions (VNNI where the CPU has it).

The int8 model is shape-specific (exported and compiled for one input shape, as the sliding
window's crops are); another shape is refused in one line. It changes the argmax of a trained
model on some pixels: that agreement and the mIoU change are measured (`upernet bench --int8`,
docs/benchmarks.md, `tests/test_fast_path.py`), never assumed.
"""
from __future__ import annotations

import copy
import time
import typing

import torch
from torch import nn

from upernet_ref.perf.fast import freezing


TORCHAO_VERSION = "0.18.0"  # the version pinned in pyproject.toml (torch 2.14.1)


def pt2e_tools() -> tuple[typing.Any, ...]:
    """torchao's PT2E pieces, or an ImportError that says how to get them."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as err:
        raise ImportError(f"the int8 path needs torchao (pip install "
                          f"torchao=={TORCHAO_VERSION}): {err}") from err
    return prepare_pt2e, convert_pt2e, move_exported_model_to_eval, xiq


class Int8Model(nn.Module):
    """The quantized, compiled model for one input shape; `{"out": float32 logits}` like the
    model. `quantize_s`: export + calibration + convert; `compile_s`: the first (compiling)
    call; `compile=False` runs the converted model uncompiled (the reference quantize /
    dequantize ops in float32: same rounding, no int8 kernels; for tests)."""

    def __init__(self, quantized: nn.Module, shape: tuple[int, ...], quantize_s: float,
                 compile: bool = True):
        super().__init__()
        self.quantized = quantized
        self.shape = shape
        self.quantize_s = quantize_s
        self.compile_s: float | None = None
        self.forward_fn = torch.compile(quantized, dynamic=False) if compile else quantized
        self.compiled = compile

    def train(self, mode: bool = True) -> Int8Model:
        """Inference only: the exported graph is always in eval mode (and refuses `.eval()`),
        so callers that set the mode (`evaluate`) only set this wrapper's flag."""
        self.training = mode
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(images.shape) != self.shape:
            raise ValueError(f"int8 model: quantized for input shape {list(self.shape)}, got "
                             f"{list(images.shape)} (quantize again for another shape)")
        start = time.perf_counter()
        with freezing(self.compiled and self.compile_s is None):  # compiles on the first call
            out = self.forward_fn(images.contiguous(memory_format=torch.channels_last))
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - start
        return {k: v.float().contiguous() for k, v in out.items()}


def int8_inference_model(model: nn.Module, calibration: typing.Iterable[torch.Tensor],
                         compile: bool = True) -> Int8Model:
    """`model` (left untouched) quantized to int8 for the shape of the calibration batches.

    `calibration`: normalized image batches (N, 3, H, W), all of one shape, e.g. a few images
    of the training set; the first one is also the export example.
    """
    prepare_pt2e, convert_pt2e, to_eval, xiq = pt2e_tools()
    batches = list(calibration)
    if not batches:
        raise ValueError("int8_inference_model: give at least one calibration batch")
    shape = tuple(batches[0].shape)
    if any(tuple(b.shape) != shape for b in batches):
        raise ValueError(f"int8_inference_model: calibration batches must all have the shape "
                         f"{list(shape)} (the model is quantized for one input shape)")
    start = time.perf_counter()
    folded = copy.deepcopy(model).cpu().eval()  # prepare_pt2e folds the BatchNorms itself
    with torch.no_grad():
        exported = torch.export.export(folded, (batches[0],), strict=True).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        quantized = convert_pt2e(prepared)
    to_eval(quantized)
    return Int8Model(quantized, shape, time.perf_counter() - start, compile=compile)
