"""The published train and test pipelines, applied jointly to an image and its label mask.

docs/SPEC.md, "Training recipe" and "Test protocol", in the order the reference applies them
(as mmsegmentation's Resize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion -> Normalize ->
Pad):

    train: random rescale (fit base_scale x ratio in ratio_range, aspect kept)
           -> random crop to crop_size, retried until no class covers > cat_max_ratio
           -> horizontal flip (p = flip_prob) -> photometric distortion
           -> normalize (ImageNet mean/std on RGB 0-255) -> pad to crop_size (0 / 255)
    test:  resize to fit base_scale (aspect kept) -> normalize; the mask is left untouched,
           because evaluation compares logits resized back to the original label size.

Images stay `uint8` through the geometric steps (resize uses torchvision's fast bilinear +
antialias kernel; masks use nearest, so no new label values appear) and become `float32` only
after the crop. Every random number comes from torch's global generator, so `torch.manual_seed`
reproduces a run; the trainer seeds each item's draws from (seed, stream position)
(`training.data_order.SeededItems`), whatever the DataLoader worker or process.

`denormalize`, `colorize` and `overlay` turn tensors back into pictures; every module that
draws a mask imports them from here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from upernet_ref.configs import DataConfig

IGNORE_COLOR = (255, 255, 255)  # how colorize draws label 255


# --------------------------------------------------------------------------------------------
# Random numbers: all from torch's global generator

def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """An integer in [low, high) (like numpy's randint)."""
    return int(torch.randint(low, high, ()).item())


def _coin(p: float = 0.5) -> bool:
    return torch.rand(()).item() < p


# --------------------------------------------------------------------------------------------
# Input checks

def check_pair(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an (image, mask) item; returns the image and the mask as uint8 (labels <= 255)."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 \
            or image.shape[0] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"image must be a uint8 tensor (3, H, W), got {got}")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.is_floating_point():
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be an integer tensor (H, W), got {got}")
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"image {tuple(image.shape[1:])} and mask {tuple(mask.shape)} sizes differ")
    if mask.dtype != torch.uint8:
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 255):
            raise ValueError(f"mask labels must lie in 0..255, got {int(mask.min())}..{int(mask.max())}")
        mask = mask.to(torch.uint8)
    return image, mask


# --------------------------------------------------------------------------------------------
# The steps

def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """(h, w) after fitting an image into `scale` = (long, short) with the aspect ratio kept.

    The factor is min(long / long_side, short / short_side), rounded as mmcv's `imrescale`.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]):
    """Resize the image bilinearly (antialiased) and the mask with nearest neighbour."""
    size = [max(int(size[0]), 1), max(int(size[1]), 1)]
    image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    if mask is not None:
        mask = F.resize(mask[None], size, interpolation=InterpolationMode.NEAREST)[0]
    return image, mask


def random_rescale(image: torch.Tensor, mask: torch.Tensor, base_scale: Sequence[int],
                   ratio_range: Sequence[float]):
    """Fit the image into base_scale x ratio, ratio ~ U(ratio_range) (docs/SPEC.md,
    "Training recipe")."""
    ratio = _uniform(*ratio_range)
    scale = (int(base_scale[0] * ratio), int(base_scale[1] * ratio))
    return resize_pair(image, mask, rescale_size(image.shape[-2], image.shape[-1], scale))


def random_crop(image: torch.Tensor, mask: torch.Tensor, crop_size: Sequence[int],
                cat_max_ratio: float = 1.0, ignore_index: int = 255, attempts: int = 10):
    """A random crop of at most crop_size (h, w); a smaller image is kept whole (padded later).

    With cat_max_ratio < 1 the crop is redrawn up to `attempts` times until it holds at least
    two classes and none of them covers cat_max_ratio or more of its labelled pixels; the last
    draw is used otherwise (as mmsegmentation's RandomCrop).
    """
    h, w = mask.shape
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)

    def draw() -> tuple[int, int]:
        return _randint(0, h - ch + 1), _randint(0, w - cw + 1)

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(attempts):
            counts = torch.bincount(mask[top:top + ch, left:left + cw].reshape(-1), minlength=256)
            counts[ignore_index] = 0
            present = counts[counts > 0]
            if len(present) > 1 and present.max().item() / present.sum().item() < cat_max_ratio:
                break
            top, left = draw()
    return image[:, top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]


def random_hflip(image: torch.Tensor, mask: torch.Tensor, p: float = 0.5):
    """Flip image and mask left-right together with probability p."""
    if _coin(p):
        return image.flip(-1), mask.flip(-1)
    return image, mask


def _adjust_hsv(image: torch.Tensor, saturation: float | None, hue_shift: float | None) -> torch.Tensor:
    """Scale HSV saturation (clipped at 1) and rotate hue (in OpenCV units, 180 per turn).

    float32 (3, H, W) in 0..255. Works on V = max, delta = max - min and the hue sextant, the
    same decomposition OpenCV's HSV uses, but without its uint8 quantisation.
    """
    r, g, b = image.unbind(0)
    value = image.amax(0)
    delta = value - image.amin(0)
    safe = delta.clamp_min(1e-6)
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))  # 0..6
    if saturation is not None:
        delta = torch.minimum(delta * saturation, value)  # S' = min(S x alpha, 1), delta = V x S
    if hue_shift is not None:
        hue = (hue + hue_shift / 30.0) % 6  # 180 OpenCV units = 6 sextants
    k = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + hue) % 6
    return value - delta * torch.minimum(k, 4 - k).clamp(0, 1)


def photometric_distortion(image: torch.Tensor, brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion on a uint8 or float32 image -> float32 0..255.

    Brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)), saturation (x U(0.5, 1.5) in HSV) and
    hue (+U{-18..17} of 180), each with probability 0.5; contrast goes first or last at random.
    """
    image = image.float()
    if _coin():
        image = (image + _uniform(-brightness_delta, brightness_delta)).clamp_(0, 255)
    contrast_first = _coin()

    def contrast(img: torch.Tensor) -> torch.Tensor:
        return (img * _uniform(*contrast_range)).clamp_(0, 255) if _coin() else img

    if contrast_first:
        image = contrast(image)
    saturation = _uniform(*saturation_range) if _coin() else None
    hue_shift = float(_randint(-hue_delta, hue_delta)) if _coin() else None
    if saturation is not None or hue_shift is not None:
        image = _adjust_hsv(image, saturation, hue_shift)
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(image - mean) / std per RGB channel, on the 0-255 scale; returns float32."""
    return F.normalize(image.float(), list(mean), list(std))


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: Sequence[int], ignore_index: int = 255):
    """Pad bottom/right to `size` (h, w): image with 0 (after normalization), mask with ignore."""
    ph, pw = max(size[0] - image.shape[-2], 0), max(size[1] - image.shape[-1], 0)
    if ph or pw:
        image = F.pad(image, [0, 0, pw, ph], fill=0.0)
        mask = F.pad(mask[None], [0, 0, pw, ph], fill=ignore_index)[0]
    return image, mask


# --------------------------------------------------------------------------------------------
# The pipelines

class TrainTransform:
    """The published training pipeline (docs/SPEC.md, "Training recipe"); see `train_transform`."""

    def __init__(self, data_cfg: DataConfig) -> None:
        self.cfg = data_cfg

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one item. With `trace=[]`, (step name, image, mask) is appended per step."""
        c = self.cfg
        image, mask = check_pair(image, mask)
        steps = (
            ("rescale", lambda i, m: random_rescale(i, m, c.base_scale, c.ratio_range)),
            ("crop", lambda i, m: random_crop(i, m, c.crop_size, c.cat_max_ratio, c.ignore_index)),
            ("flip", lambda i, m: random_hflip(i, m, c.flip_prob)),
            ("photometric", lambda i, m: (photometric_distortion(i) if c.photometric else i.float(), m)),
            ("normalize", lambda i, m: (normalize(i, c.mean, c.std), m)),
            ("pad", lambda i, m: pad_to(i, m, c.crop_size, c.ignore_index)),
        )
        for name, step in steps:
            image, mask = step(image, mask)
            if trace is not None:
                trace.append((name, image, mask))
        return image.contiguous(), mask.long()

    def __repr__(self) -> str:
        c = self.cfg
        return (f"TrainTransform(base_scale={c.base_scale}, ratio_range={c.ratio_range}, "
                f"crop_size={c.crop_size}, cat_max_ratio={c.cat_max_ratio}, "
                f"flip_prob={c.flip_prob}, photometric={c.photometric})")


class TestTransform:
    """The published test pipeline (docs/SPEC.md, "Test protocol"); see `test_transform`."""

    def __init__(self, data_cfg: DataConfig) -> None:
        self.cfg = data_cfg

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        c = self.cfg
        if mask is None:  # prediction on an unlabelled image
            check_pair(image, torch.zeros(image.shape[-2:], dtype=torch.uint8))
        else:
            check_pair(image, mask)
        size = rescale_size(image.shape[-2], image.shape[-1], c.base_scale)
        image, _ = resize_pair(image, None, size)
        image = normalize(image, c.mean, c.std)
        return image, (None if mask is None else mask.long())

    def __repr__(self) -> str:
        return f"TestTransform(base_scale={self.cfg.base_scale})"


def train_transform(data_cfg: DataConfig) -> TrainTransform:
    """`(uint8 (3,H,W), int (H,W)) -> (float32 (3,*crop_size), int64 crop_size)`, random."""
    return TrainTransform(data_cfg)


def test_transform(data_cfg: DataConfig) -> TestTransform:
    """`(uint8 (3,H,W), int (H,W)) -> (float32 (3,h,w) fitted to base_scale, the int64 mask)`."""
    return TestTransform(data_cfg)


# --------------------------------------------------------------------------------------------
# Pictures

def denormalize(image: torch.Tensor, data_cfg: DataConfig) -> torch.Tensor:
    """Undo `normalize`: float (..., 3, H, W) -> uint8 RGB for display."""
    mean = torch.tensor(data_cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data_cfg.std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() * std + mean).round_().clamp_(0, 255).to(torch.uint8)


def _palette_lut(palette: Sequence[Sequence[int]], ignore_color: Sequence[int]) -> torch.Tensor:
    if len(palette) > 256:
        raise ValueError(f"palette has {len(palette)} colours; at most 256 labels fit a uint8 mask")
    lut = torch.zeros(256, 3, dtype=torch.uint8)
    lut[:len(palette)] = torch.tensor([tuple(c) for c in palette], dtype=torch.uint8).view(-1, 3)
    if len(palette) <= 255:
        lut[255] = torch.tensor(ignore_color, dtype=torch.uint8)
    return lut


def colorize(mask, palette: Sequence[Sequence[int]],
             ignore_color: Sequence[int] = IGNORE_COLOR) -> torch.Tensor:
    """Label mask (H, W) -> uint8 RGB (3, H, W) with `palette[label]` (255 in `ignore_color`)."""
    mask = torch.as_tensor(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {tuple(mask.shape)}")
    mask = mask.long()
    bad = (mask < 0) | ((mask >= len(palette)) & (mask != 255))
    if bad.any():
        raise ValueError(f"mask has label {int(mask[bad][0])} but the palette has only "
                         f"{len(palette)} colours (and 255 = ignore)")
    return _palette_lut(palette, ignore_color)[mask].permute(2, 0, 1).contiguous()


def overlay(image: torch.Tensor, mask, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> torch.Tensor:
    """Blend the colorized mask over a uint8 (3, H, W) image; ignored pixels show the image."""
    mask = torch.as_tensor(mask)
    if image.dtype != torch.uint8 or image.ndim != 3 or tuple(image.shape[1:]) != tuple(mask.shape):
        raise ValueError(f"overlay needs a uint8 image (3, H, W) and a mask (H, W) of the same size, "
                         f"got {image.dtype} {tuple(image.shape)} and {tuple(mask.shape)}")
    colors = colorize(mask, palette).float()
    blend = (1 - alpha) * image.float() + alpha * colors
    blend = torch.where(mask.long() == 255, image.float(), blend)
    return blend.round_().clamp_(0, 255).to(torch.uint8)


# `test_transform` / `TestTransform` are library names, not pytest tests.
test_transform.__test__ = False
TestTransform.__test__ = False
