"""Test-time inference: whole image, sliding window, multi-scale + flip (docs/SPEC.md, "Test protocol").

The published protocol (the table's numbers) resizes the image to fit the base scale (aspect
kept; `transforms.test_transform`), runs the network once on the whole image, resizes the logits
back to the original label size and takes the argmax. Two usual extras:

- *sliding window*: crops of `crop_size` every `stride` pixels; windows that would cross the
  bottom / right edge are shifted back inside (as mmsegmentation does), images smaller than the
  crop are zero-padded (0 = the mean colour after normalisation) and the padding is cut off the
  logits; overlapping logits are averaged with a count map.
- *multi-scale + flip* (TTA): the resized image is rescaled by each factor (0.5 ... 1.75) and
  optionally mirrored; every view is run (whole or sliding), its logits are resized to the output
  size, mirrored back, turned into softmax probabilities and averaged.

Why average probabilities and not logits: logit magnitudes differ between scales (a view at 1.75x
is more confident than one at 0.5x), so summing logits lets the most confident view dominate;
softmax puts every view on the same [0, 1] scale, each casting one normalised vote. This is also
what mmsegmentation's `aug_test` does. `inference` therefore always returns probabilities (for a
single view the argmax is the logits' argmax).

Memory: views are run one at a time and added into one accumulator of the output size, under
`torch.no_grad()`, so 6 scales x flip need one forward at the largest scale plus the
accumulator, not 12 sets of logits. That accumulator is C x H x W floats at the *output*
size: 14.4 GB for a 6000x4000 photo and 150 classes. `predict_labels` (what `upernet eval`
and `upernet predict` use) builds the labels of such an output in bands of rows from the
views' logits at the network's own size (bounded by the base scale the image is fitted to),
never holding C x H x W.

Every option comes from one resolved `configs.TestConfig` (`cfg.test`): to try another
protocol, change the configuration, e.g. `dataclasses.replace(cfg.test, mode="slide")` or
`configs.override(cfg, {"test.mode": "slide"}).test`, as `upernet eval --test.mode=slide` does.
"""
from __future__ import annotations

import itertools
import typing

import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref.configs import TestConfig
from upernet_ref.model.head import resize


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def window_grid(size: tuple[int, int], crop_size: tuple[int, int],
                stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, y2, x1, x2) covering an image of `size` (H, W).

    Windows start every `stride`; the last one in each direction is shifted back so that it ends
    at the image border (never past it). An image smaller than the crop gets one window, the
    whole image (it is padded by `slide_inference`).
    """
    if len(crop_size) != 2:  # TestConfig's () is the training crop, filled in by a Config
        raise ValueError(f"a sliding window needs test.crop_size HxW, got {crop_size!r}")
    (h, w), (ch, cw), (sh, sw) = size, crop_size, stride
    if min(ch, cw, sh, sw) <= 0:
        raise ValueError(f"crop {crop_size} and stride {stride} must be positive")
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def slide_inference(model: nn.Module, image: torch.Tensor, crop_size: tuple[int, int],
                    stride: tuple[int, int]) -> torch.Tensor:
    """Logits (B, C, H, W) of `image` (B, 3, H, W) from overlapping windows, averaged."""
    b, _, h, w = image.shape
    ch, cw = crop_size
    logits = count = None
    for y1, y2, x1, x2 in window_grid((h, w), crop_size, stride):
        crop = image[:, :, y1:y2, x1:x2]
        ph, pw = ch - crop.shape[2], cw - crop.shape[3]
        if ph > 0 or pw > 0:  # only when the image is smaller than the crop
            crop = F.pad(crop, (0, max(pw, 0), 0, max(ph, 0)))
        out = _logits(model, crop)[:, :, : y2 - y1, : x2 - x1]  # cut the padding off
        if logits is None:
            logits = image.new_zeros(b, out.shape[1], h, w)
            count = image.new_zeros(1, 1, h, w)
        logits[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def whole_inference(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Logits (B, C, H, W) of one forward pass on the whole image (the published protocol)."""
    return _logits(model, image)


def _on_model(model: nn.Module, image: torch.Tensor, out_size: tuple[int, int] | None
              ) -> tuple[torch.Tensor, tuple[int, int]]:
    """(image as (B, 3, h, w) on the model's device, the output size: `out_size` or (h, w))."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    param = next(model.parameters(), None)
    if param is not None:
        image = image.to(param.device)
    return image, tuple(out_size) if out_size is not None else tuple(image.shape[-2:])


def inference(model: nn.Module, image: torch.Tensor, test: TestConfig,
              out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Class probabilities (B, C, H_out, W_out): softmax averaged over every scale and flip.

    Args:
        model: the network in eval mode; returns logits or {"out": logits} at its input size.
        image: (B, 3, h, w) or (3, h, w) normalised image from `test_transform` (already fitted
            to the base scale); moved to the model's device.
        test: the test protocol (`cfg.test`): mode, scales, flip, crop_size, stride.
        out_size: (H, W) of the result, normally the original label size; default (h, w).

    The prediction is `inference(...).argmax(1)`; `predict_labels` gives it in bounded memory
    for outputs of any size.
    """
    image, out_size = _on_model(model, image, out_size)
    with torch.no_grad():
        probs = _accumulate(_views(model, image, test), out_size)
    return probs / num_views(test)


def num_views(test: TestConfig) -> int:
    """How many views `inference` averages: one per scale, twice with flip."""
    return len(test.scales) * (2 if test.flip else 1)


def _views(model: nn.Module, image: torch.Tensor, test: TestConfig) -> typing.Iterator[torch.Tensor]:
    """Each view's logits (B, C, h*s, w*s), at its own scale, mirrored back; one at a time."""
    h, w = image.shape[-2:]
    for scale in test.scales:
        size = (int(h * scale + 0.5), int(w * scale + 0.5))  # mmseg's rounding
        scaled = image if size == (h, w) else resize(image, size)
        for mirrored in ((False, True) if test.flip else (False,)):
            x = scaled.flip(-1) if mirrored else scaled
            logits = (slide_inference(model, x, test.crop_size, test.stride)
                      if test.mode == "slide" else whole_inference(model, x))
            yield logits.flip(-1) if mirrored else logits


def _accumulate(views: typing.Iterable[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
    """The sum over views of softmax(logits resized to `out_size`), one view at a time."""
    probs = None
    for logits in views:
        if logits.shape[-2:] != out_size:
            logits = resize(logits, out_size)
        p = logits.float().softmax(dim=1)
        if probs is None:
            probs = p
        else:
            probs += p
        del logits, p
    return probs


def resize_rows(x: torch.Tensor, out_size: tuple[int, int], r0: int, r1: int) -> torch.Tensor:
    """Rows `r0:r1` of `resize(x, out_size)` (bilinear, align_corners=False), computed from the
    input rows they need only: (B, C, r1 - r0, W_out).

    The width is resized by `resize` on those rows (the height kept), then each output row
    mixes its two source rows with the same weights as the full resize (source row
    `(r + 0.5) * h_in / H_out - 0.5`). Equal to the full resize up to float rounding (~1e-6).
    """
    in_h = x.shape[-2]
    dst = torch.arange(r0, r1, dtype=torch.float32, device=x.device)
    src = ((dst + 0.5) * (in_h / out_size[0]) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_h - 1)
    i1 = (i0 + 1).clamp(max=in_h - 1)
    w1 = (src - i0.float()).to(x.dtype)[:, None]   # (rows, 1)
    lo, hi = int(i0[0]), int(i1[-1]) + 1
    rows = resize(x[:, :, lo:hi], (hi - lo, out_size[1]))  # (B, C, hi - lo, W_out)
    return torch.lerp(rows.index_select(2, i0 - lo), rows.index_select(2, i1 - lo), w1)


def predict_labels(model: nn.Module, image: torch.Tensor, test: TestConfig,
                   out_size: tuple[int, int] | None = None, *,
                   max_bytes: int = 2 ** 30) -> torch.Tensor:
    """The prediction (B, H_out, W_out) int64: `inference(...).argmax(1)` in bounded memory.

    When the probabilities at the output size (B x C x H_out x W_out floats) fit in
    `max_bytes`, this is exactly `inference(...).argmax(1)`. A larger output (a 6000x4000
    photo with 150 classes needs 14.4 GB) is built in bands of rows instead: every view's
    logits are kept at the size the network ran at (bounded by the base scale the image was
    fitted to, whatever the photo's size), and each band is resized, softmaxed, averaged
    over the views and turned into labels before the next one, so no C x H_out x W_out
    tensor is ever held. The two agree except at exact near-ties (float rounding of the
    resize, ~1e-6).
    """
    image, out_size = _on_model(model, image, out_size)
    with torch.no_grad():
        views = _views(model, image, test)
        first = next(views)
        b, c = first.shape[:2]
        height, width = out_size
        if b * c * height * width * 4 <= max_bytes:  # the accumulator fits: as `inference`
            probs = _accumulate(itertools.chain([first], views), out_size)
            return (probs / num_views(test)).argmax(1)
        kept = [first] + list(views)  # (B, C, h*s, w*s) each
        labels = torch.empty(b, height, width, dtype=torch.long, device=first.device)
        # a band's resize holds about four band-sized tensors (two source rows each, their
        # mix, the sum over views): a quarter of the budget each
        rows = max(1, max_bytes // (16 * b * c * width))
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            bands = (resize_rows(v, out_size, r0, r1) for v in kept)
            # one view: the logits' argmax is the probabilities' (no softmax needed)
            scores = next(bands) if len(kept) == 1 else _accumulate(bands, (r1 - r0, width))
            labels[:, r0:r1] = scores.argmax(1)
            del scores
    return labels
