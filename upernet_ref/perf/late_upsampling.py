"""Late upsampling: the head's two concatenate-then-convolve layers with the bilinear
upsampling moved after the weights (`--fast` on the CPU, inference and training).

UPerNet fuses maps of several resolutions the same way twice (Xiao et al. 2018, section 3.1):
the PPM bottleneck is a 3x3 conv over [C5, its four pooled branches upsampled from 1x1, 2x2,
3x3 and 6x6] (`model/ppm.py`), and the fusion layer a 3x3 conv over [P2, P3, P4 and P5
upsampled to 1/4 of the input] (`model/head.py`). Written that way, most of their work is spent
on upsampled pixels: at output stride 8, three quarters of the fusion conv's input (2048 -> 512
at 1/4 resolution, 39% of the MACs of R-50 os8 at 512x512) is P3-P5 upsampled 2x from 1/8.

Bilinear resizing is linear and works on each channel alone, so it commutes with anything that
mixes channels pixel by pixel. A k x k conv is a sum over its k*k taps t of a 1x1 channel mixing
W_t of the input shifted by t, hence, for the channels of an upsampled input:

    conv(up(x)) = sum_t shift_t(W_t up(x)) = sum_t shift_t(up(W_t x))

with the same zero padding on both sides. The right-hand side makes the k*k mixings at the
coarse resolution (one 1x1 conv with k*k*out channels), upsamples them and adds the k*k shifted
copies (`shifted_sum`). It is the same function up to float rounding, with 4x fewer MACs for
the channels upsampled 2x and almost none for the PPM's pooled branches: R-50 os8 at 512x512
goes from 397.5 to 272 GMACs per image. The modules, parameter names and state dict are the
model's own: `late_upsampling` only changes the class of the two heads' modules to a subclass
whose forward computes those two convs this way (the published layer is `UPerHead` /
`PyramidPooling`, which the eager reference keeps running).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref.model.head import UPerHead
from upernet_ref.model.layers import ConvBNReLU, resize
from upernet_ref.model.ppm import PyramidPooling


def _taps(k: int, h: int, w: int):
    """For each tap t = (i, j) of a k x k kernel (padding k // 2) on an h x w map: t's index,
    the output window it adds to and the input window it reads, as (rows, cols) slices; the
    zero padding is what the windows leave out."""
    r = k // 2
    for i in range(k):
        for j in range(k):
            dy, dx = i - r, j - r
            rows, cols = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
            yield (i * k + j, (rows, cols),
                   (slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx)))


class _ShiftedSum(torch.autograd.Function):
    """`shifted_sum`, with a backward that writes the gradient's k*k shifted copies into one
    tensor (autograd's own backward of k*k slices makes a zero-filled copy per slice: measured
    1.5x slower for the fusion layer's training step)."""

    @staticmethod
    def forward(ctx, taps: torch.Tensor, k: int) -> torch.Tensor:
        b, channels, h, w = taps.shape
        c, r = channels // (k * k), k // 2
        # Each tap's window of the zero-padded taps, added whole: no scatter into slices,
        # which inductor's oneDNN conv + add fusion cannot take (the compiled fast path).
        # Summed in float32 at least, as a conv accumulates: bf16 sums of the 9 taps cost the
        # trained demo model 0.01% of argmax agreement with fp32 on real images (99.898%).
        padded = F.pad(taps, (r, r, r, r))
        out = None
        for i in range(k):
            for j in range(k):
                t = i * k + j
                window = padded[:, t * c:(t + 1) * c, i:i + h, j:j + w]
                out = (window.to(torch.promote_types(window.dtype, torch.float32), copy=True)
                       if out is None else out.add_(window))
        ctx.k, ctx.shape, ctx.dtype = k, taps.shape, taps.dtype
        ctx.memory_format = (torch.channels_last
                             if taps.is_contiguous(memory_format=torch.channels_last)
                             else torch.contiguous_format)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, channels, h, w = ctx.shape
        c = channels // (ctx.k * ctx.k)
        grad_taps = grad.new_zeros(ctx.shape, dtype=ctx.dtype).contiguous(
            memory_format=ctx.memory_format)
        for t, (rows, cols), (in_rows, in_cols) in _taps(ctx.k, h, w):
            grad_taps[:, t * c:(t + 1) * c, in_rows, in_cols] = grad[:, :, rows, cols]
        return grad_taps, None


def shifted_sum(taps: torch.Tensor, k: int) -> torch.Tensor:
    """The sum a k x k conv (stride 1, padding k // 2) makes of its taps' 1x1 mixings.

    `taps`: (B, k*k*C, H, W), the mixing of tap t = (i, j) in channels t*C ... (t+1)*C - 1 with
    t = i*k + j; returns (B, C, H, W) with out[:, :, p] = sum_t taps[:, t-block, p + (i - k//2,
    j - k//2)], a tap that falls outside the map adding nothing (the zero padding); summed
    in float32 when the taps are bf16 / fp16 (autocast)."""
    return _ShiftedSum.apply(taps, k)


def _plain(conv: nn.Conv2d) -> bool:
    """A conv this rewriting is exact for: square odd kernel, stride 1, 'same' zero padding."""
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and conv.stride == (1, 1)
            and conv.padding == (k // 2, k // 2) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def conv_of_resized(conv: nn.Conv2d, inputs: list[torch.Tensor],
                    size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """`conv(torch.cat([resize(x, size) for x in inputs], 1))`, with the inputs that have fewer
    pixels than `size` mixed by the conv's weights before they are upsampled (module docstring).

    Inputs of the same coarse size share one 1x1 conv and one upsampling; inputs at `size` (or
    larger) go through the conv as they are. A conv this is not exact for, or inputs with none
    at `size`, are computed as written.
    """
    size = tuple(size)
    pixels = size[0] * size[1]
    channels = [x.shape[1] for x in inputs]
    weights = conv.weight.split(channels, dim=1)
    direct = [(x, w) for x, w in zip(inputs, weights) if tuple(x.shape[-2:]) == size]
    if not _plain(conv) or not direct:
        return conv(torch.cat([resize(x, size) if tuple(x.shape[-2:]) != size else x
                               for x in inputs], dim=1))
    k = conv.kernel_size[0]
    groups: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for x, w in zip(inputs, weights):
        if tuple(x.shape[-2:]) == size:
            continue
        if x.shape[-2] * x.shape[-1] >= pixels:  # not coarser: resize, then conv as written
            direct.append((resize(x, size), w))
        else:
            groups.setdefault(tuple(x.shape[-2:]), []).append((x, w))
    out = F.conv2d(torch.cat([x for x, _ in direct], 1), torch.cat([w for _, w in direct], 1),
                   conv.bias, padding=k // 2)
    taps = None
    for members in groups.values():
        weight = torch.cat([w for _, w in members], 1)  # (out, in, k, k)
        mixing = weight.permute(2, 3, 0, 1).reshape(k * k * weight.shape[0], weight.shape[1], 1, 1)
        mixed = F.conv2d(torch.cat([x for x, _ in members], 1), mixing)
        upsampled = resize(mixed, size)
        taps = upsampled if taps is None else taps + upsampled
    if taps is None:
        return out
    if out.is_contiguous(memory_format=torch.channels_last):
        taps = taps.contiguous(memory_format=torch.channels_last)  # a 1x1 map's layout is lost
    return (out + shifted_sum(taps, k)).to(out.dtype)


def _conv_bn_relu(block: ConvBNReLU, inputs: list[torch.Tensor],
                  size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return block.relu(block.bn(conv_of_resized(block.conv, inputs, size)))


class LateUpsamplingPPM(PyramidPooling):
    """`PyramidPooling` whose bottleneck mixes the pooled branches before upsampling them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [branch(F.adaptive_avg_pool2d(x, scale))
                    for scale, branch in zip(self.pool_scales, self.branches)]
        return _conv_bn_relu(self.bottleneck, [x] + branches, x.shape[-2:])


class LateUpsamplingUPerHead(UPerHead):
    """`UPerHead` whose fusion conv mixes P3-P5 before upsampling them to 1/4."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outs = self.fpn_features(features)
        fused = _conv_bn_relu(self.fuse, outs, outs[0].shape[-2:])
        return self.classifier(self.dropout(fused))


def late_upsampling(model: nn.Module) -> nn.Module:
    """`model` (in place) with every `UPerHead` and `PyramidPooling` computing its fusion conv by
    `conv_of_resized`; returns it. Only the modules' class changes (to the subclasses above):
    parameters, buffers, names and state dict are untouched, and the function is the same up to
    float rounding (`tests/test_late_upsampling.py`). A module whose fusion layer is not a plain
    `ConvBNReLU` (e.g. wrapped to run in float32) is left as it is."""
    for module in model.modules():
        if type(module) is PyramidPooling and isinstance(module.bottleneck, ConvBNReLU):
            module.__class__ = LateUpsamplingPPM
        elif type(module) is UPerHead and isinstance(module.fuse, ConvBNReLU):
            module.__class__ = LateUpsamplingUPerHead
    return model
