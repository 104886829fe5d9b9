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


class _ShiftedSum(torch.autograd.Function):
    """`shifted_sum`. The forward adds tap t = (i, j)'s window [i : i + H, j : j + W] of the
    zero-padded taps; the backward writes the gradient's shifted copies straight into one
    gradient of the taps (autograd's own backward of the k*k windows makes a zero-filled copy
    per window, and a padded buffer one more copy: measured 1.5x slower for the fusion layer's
    training step)."""

    @staticmethod
    def forward(ctx, taps: torch.Tensor, k: int) -> torch.Tensor:
        b, channels, h, w = taps.shape
        c, r = channels // (k * k), k // 2
        padded = F.pad(taps, (r, r, r, r))
        # Summed in float32 at least, as a conv accumulates: bf16 sums of the 9 taps cost the
        # trained demo model 0.01% of argmax agreement with fp32 on real images (99.898%).
        out = torch.zeros(b, c, h, w, dtype=_summed_in(taps.dtype),
                          device=taps.device).contiguous(memory_format=_layout(taps))
        for i in range(k):
            for j in range(k):
                t = i * k + j
                # each window added whole: no scatter into slices, which inductor's oneDNN
                # conv + add fusion cannot take (the compiled fast path)
                out += padded[:, t * c:(t + 1) * c, i:i + h, j:j + w]
        ctx.k, ctx.shape, ctx.dtype, ctx.layout = k, taps.shape, taps.dtype, _layout(taps)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, channels, h, w = ctx.shape
        k, c, r = ctx.k, channels // (ctx.k * ctx.k), ctx.k // 2
        grad_taps = grad.new_zeros(ctx.shape, dtype=ctx.dtype).contiguous(memory_format=ctx.layout)
        for i in range(k):
            for j in range(k):
                t, dy, dx = i * k + j, i - r, j - r
                # the outputs p whose tap t reads inside the map (p + (dy, dx)), none when the
                # offset is larger than the map
                y0, y1 = max(0, -dy), max(0, min(h, h - dy))
                x0, x1 = max(0, -dx), max(0, min(w, w - dx))
                if y0 < y1 and x0 < x1:
                    grad_taps[:, t * c:(t + 1) * c, y0 + dy:y1 + dy, x0 + dx:x1 + dx] = (
                        grad[:, :, y0:y1, x0:x1])
        return grad_taps, None


def _summed_in(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16 / fp16 taps (autocast), as a conv accumulates; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format)


def shifted_sum(taps: torch.Tensor, k: int) -> torch.Tensor:
    """The sum a k x k conv (stride 1, padding k // 2) makes of its taps' 1x1 mixings.

    `taps`: (B, k*k*C, H, W), the mixing of tap t = (i, j) in channels t*C ... (t+1)*C - 1 with
    t = i*k + j; returns (B, C, H, W) with out[:, :, p] = sum_t taps[:, t-block, p + (i - k//2,
    j - k//2)], a tap that falls outside the map adding nothing (the zero padding). Summed,
    and returned, in float32 when the taps are bf16 / fp16 (autocast); the gradient has the
    taps' dtype and layout."""
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
    if not _plain(conv) or all(tuple(x.shape[-2:]) != size for x in inputs):
        return conv(torch.cat([resize(x, size) for x in inputs], dim=1))
    k = conv.kernel_size[0]
    direct: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input at `size`, its weights)
    coarse: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # by size
    for x, w in zip(inputs, conv.weight.split([x.shape[1] for x in inputs], dim=1)):
        if x.shape[-2] * x.shape[-1] < size[0] * size[1]:
            coarse.setdefault(tuple(x.shape[-2:]), []).append((x, w))
        else:  # at `size`, or larger (resized down, then convolved as written)
            direct.append((x if tuple(x.shape[-2:]) == size else resize(x, size), w))
    out = F.conv2d(torch.cat([x for x, _ in direct], 1), torch.cat([w for _, w in direct], 1),
                   conv.bias, padding=k // 2)
    if not coarse:
        return out
    taps = None
    for members in coarse.values():
        weight = torch.cat([w for _, w in members], 1)  # (out, in, k, k)
        mixing = weight.permute(2, 3, 0, 1).reshape(k * k * weight.shape[0], weight.shape[1], 1, 1)
        upsampled = resize(F.conv2d(torch.cat([x for x, _ in members], 1), mixing), size)
        # several sizes (the PPM's four branches): their taps added in float32 at least
        taps = upsampled if taps is None else (
            taps.to(_summed_in(taps.dtype)) + upsampled)
    taps = taps.contiguous(memory_format=_layout(out))  # a 1x1 map's layout is ambiguous
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
