"""The embedded demo dataset: procedurally generated scenes, shipped as code (no download).

UPerNet's published numbers need VOC, ADE20K or Cityscapes (docs/SPEC.md,
"Data on disk"). To train and test
the whole pipeline on a laptop without them, `DemoScenes` draws small outdoor-like scenes:
a sky and a ground split by a tilted, wavy horizon, and 3-6 shapes painted in depth order (later
shapes occlude earlier ones). Each class has its own colour *and* texture distribution, with
per-image jitter and pixel noise, and classes are paired so that colour alone is not enough
(disc and ring share a colour family, triangle and cross another): the shape matters.
Like VOC, the labels carry 255 (ignore) on a thin boundary around every region and on the
occasional "clutter" blotch.

Item `i` of a split is drawn from its own random generator seeded with (seed, split, i), so it is
the same in every process and DataLoader worker. Drawing one costs under 2 ms at 96x128 (no
files, no cache).

    >>> ds = DemoScenes("train", num_samples=4)
    >>> image, mask = ds[0]          # uint8 (3, 96, 128), int64 (96, 128), labels 0..7 and 255
"""
from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import torch

from upernet_ref.data.info import DATASETS

DEMO_CLASSES = DATASETS["demo"].classes    # its description: upernet_ref/data/info.py
DEMO_PALETTE = list(DATASETS["demo"].palette)
IGNORE_INDEX = 255
DEFAULT_NUM_SAMPLES = {"train": 400, "val": 50, "test": 50}

# Colour families (RGB means). Disc and ring, triangle and cross, differ only slightly in colour:
# per-image jitter and pixel noise make their colours overlap, so the shape has to decide.
_COLOURS = {2: (205.0, 85.0, 55.0), 6: (215.0, 110.0, 45.0),     # warm: disc, ring
            4: (55.0, 170.0, 115.0), 7: (55.0, 160.0, 140.0)}    # cool: triangle, cross
_OBJECT_CLASSES = (2, 3, 4, 5, 6, 7)


class DemoScenes(torch.utils.data.Dataset):
    """Procedural segmentation scenes following the project's data contract (docs/DESIGN.md).

    Args:
        split: "train", "val" or "test"; each split draws from its own seeds.
        num_samples: number of items (default 400 for train, 50 for val and test).
        size: (height, width) of every image.
        seed: base seed; (seed, split, index) fixes an item.
        transform: optional `transform(image, mask)` applied to every item.
    """

    classes = DEMO_CLASSES
    palette = DEMO_PALETTE
    ignore_index = IGNORE_INDEX

    def __init__(self, split: str = "train", num_samples: int | None = None,
                 size: tuple[int, int] = (96, 128), seed: int = 0,
                 transform: Callable | None = None) -> None:
        if split not in DEFAULT_NUM_SAMPLES:
            raise ValueError(f"DemoScenes: unknown split {split!r}; use one of {tuple(DEFAULT_NUM_SAMPLES)}")
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"DemoScenes: size must be (height, width) with both >= 16, got {size!r}")
        self.split = split
        self.num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise ValueError(f"DemoScenes: num_samples must be >= 0, got {num_samples}")
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.transform = transform
        self._split_code = zlib.crc32(split.encode())  # stable across processes (unlike hash())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        """Where item `index` comes from (for error messages): generated, not a file."""
        return f"DemoScenes(split={self.split!r}, seed={self.seed}, size={self.size})[{index}] (generated)"

    def generator(self, index: int) -> np.random.Generator:
        """The random generator that draws item `index`, seeded by (seed, split, index)."""
        return np.random.default_rng([self.seed, self._split_code, index])

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"DemoScenes: index {index} out of range for {len(self)} items")
        index = index % len(self)
        image, mask = generate_scene(self.generator(index), self.size)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W) uint8
        mask = torch.from_numpy(mask.astype(np.int64))                            # (H, W) int64
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


# --------------------------------------------------------------------------------------------
# Scene generation (numpy, vectorised over pixels)

def _coarse_noise(rng: np.random.Generator, size: tuple[int, int], cell: int) -> np.ndarray:
    """Blocky low-frequency noise, (H, W) float32 in ~N(0, 1): a cheap texture."""
    h, w = size
    small = rng.standard_normal((h // cell + 1, w // cell + 1), dtype=np.float32)
    return np.repeat(np.repeat(small, cell, 0), cell, 1)[:h, :w]


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside shape `cls`, given coordinates (u, v) rotated into the shape's frame."""
    if cls == 2:    # disc
        return u * u + v * v < r * r
    if cls == 3:    # square
        return (np.abs(u) < 0.85 * r) & (np.abs(v) < 0.85 * r)
    if cls == 4:    # triangle: three half-planes, apex up in the shape's frame
        return (v < 0.5 * r) & (np.sqrt(3.0) * u - v < r) & (-np.sqrt(3.0) * u - v < r)
    if cls == 5:    # bar: a long thin rectangle
        return (np.abs(u) < 1.7 * r) & (np.abs(v) < 0.35 * r)
    if cls == 6:    # ring
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if cls == 7:    # cross
        a, b = np.abs(u), np.abs(v)
        return ((a < r) & (b < 0.3 * r)) | ((a < 0.3 * r) & (b < r))
    raise ValueError(f"not an object class: {cls}")


def _paint(cls: int, rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
           r: float) -> np.ndarray:
    """The texture of class `cls`, (H, W, 3) float32, before pixel noise."""
    jitter = rng.uniform(-25, 25, 3).astype(np.float32)
    if cls in (2, 6):   # warm, radially shaded
        shade = 1.0 - 0.25 * np.clip((u * u + v * v) / (r * r), 0, 1)
        return (np.array(_COLOURS[cls], np.float32) + jitter) * shade[..., None]
    if cls in (4, 7):   # cool, flat with a gentle gradient along u
        shade = 1.0 + 0.15 * np.clip(u / r, -1, 1)
        return (np.array(_COLOURS[cls], np.float32) + jitter) * shade[..., None]
    if cls == 3:        # yellow checkerboard
        cell = rng.uniform(3, 6)
        check = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        light = np.array((215, 195, 70), np.float32) + jitter
        return light - check[..., None] * np.float32(70)
    if cls == 5:        # purple stripes across the bar
        period = rng.uniform(4, 8)
        stripe = (np.floor(u / period) % 2).astype(np.float32)
        base = np.array((150, 80, 200), np.float32) + jitter
        return base - stripe[..., None] * np.float32(75)
    raise ValueError(f"not an object class: {cls}")


def generate_scene(rng: np.random.Generator, size: tuple[int, int] = (96, 128)):
    """One scene: (uint8 (H, W, 3) RGB image, uint8 (H, W) labels 0..7 with 255 = ignore)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Sky over ground, split by a tilted wavy horizon (a function of x only).
    x = xx[0]
    horizon = (rng.uniform(0.35, 0.65) * h + rng.uniform(-0.2, 0.2) * (x - w / 2)
               + rng.uniform(0, 3) * np.sin(x / rng.uniform(6, 15) + rng.uniform(0, 6.3)))
    ground = yy > horizon
    label = ground.astype(np.uint8)
    top = np.array((100, 150, 225), np.float32) + rng.uniform(-25, 25, 3).astype(np.float32)
    bottom = np.array((185, 210, 240), np.float32) + rng.uniform(-20, 15, 3).astype(np.float32)
    t = (yy[:, :1] / h)[..., None]                       # (H, 1, 1): a vertical gradient
    sky = top * (1 - t) + bottom * t
    soil = np.array((125, 105, 65), np.float32) + rng.uniform(-25, 25, 3).astype(np.float32)
    soil = soil * (1 + 0.18 * _coarse_noise(rng, size, int(rng.integers(2, 5))))[..., None]
    image = np.where(ground[..., None], soil, sky)

    # Objects in depth order: each one occludes what was painted before. Work in the shape's
    # bounding window only (every shape fits in a radius of 1.75 r).
    side = min(h, w)
    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.choice(_OBJECT_CLASSES))
        r = rng.uniform(0.12, 0.28) * side
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, 2 * np.pi)
        x0, x1 = max(int(cx - 1.75 * r), 0), min(int(cx + 1.75 * r) + 2, w)
        y0, y1 = max(int(cy - 1.75 * r), 0), min(int(cy + 1.75 * r) + 2, h)
        win = (slice(y0, y1), slice(x0, x1))
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = xx[win] - cx, yy[win] - cy
        u, v = c * dx + s * dy, -s * dx + c * dy
        inside = _shape_mask(cls, u, v, r)
        if not inside.any():
            continue
        image[win] = np.where(inside[..., None], _paint(cls, rng, u, v, r), image[win])
        label[win][inside] = cls

    # Pixel noise, so a single pixel's colour is not a perfect cue.
    image += np.float32(rng.uniform(6, 14)) * rng.standard_normal(image.shape, dtype=np.float32)

    # Ignore (255): a one-pixel boundary wherever the label changes, as VOC marks its outlines.
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    # ...and, in a third of the images, an unlabelled blotch of clutter painted on top.
    if rng.random() < 1 / 3:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ax, ay = rng.uniform(0.05, 0.15) * side, rng.uniform(0.05, 0.15) * side
        win = (slice(max(int(cy - ay), 0), min(int(cy + ay) + 2, h)),
               slice(max(int(cx - ax), 0), min(int(cx + ax) + 2, w)))
        blotch = ((xx[win] - cx) / ax) ** 2 + ((yy[win] - cy) / ay) ** 2 < 1
        clutter = rng.uniform(0, 255, blotch.shape + (3,)).astype(np.float32)
        image[win] = np.where(blotch[..., None], clutter, image[win])
        edge[win] |= blotch
    label[edge] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), label
