"""Segmentation datasets on disk: VOC, ADE20K, Cityscapes and a folder of your own.

Every dataset follows the data contract of docs/DESIGN.md: item `i` is `(image, mask)` with
`image` uint8 (3, H, W) RGB and `mask` int64 (H, W) of *training* labels `0..C-1` or 255
(ignore), or `transform(image, mask)`. The raw label files use each benchmark's own convention
(docs/SPEC.md, "Data on disk"), turned into training labels by one 256-entry look-up table per dataset:

    VOC         0..20 and 255 (boundary) kept as they are
    ADE20K      reduce-zero-label: 0 ("other") -> 255, k -> k - 1 (1..150 -> 0..149)
    Cityscapes  official ids 0..33 -> 19 train ids (others 255), or precomputed labelTrainIds

A raw value the table does not know is an error naming the file: labels are never clipped or
relabelled silently. With `on_bad="skip"` (`--data.on_bad=skip`) a bad item is replaced by the
next good one, so a training batch keeps its size; `skipped_samples(dataset)` lists every item
skipped so far, by this process, its DataLoader workers (a flag per item in shared memory) and,
under torchrun, every rank. `evaluate` leaves bad items out instead of replacing them.
"""
from __future__ import annotations

import io
import logging
import typing
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode

from upernet_ref.data.images import IMAGE_SUFFIXES, decode_bytes, read_image
from upernet_ref.errors import DataError
from upernet_ref.data.info import (DATASETS, IGNORE_INDEX, class_palette,
                                   describe_values, label_lut)

_log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# Decoding (images: `upernet_ref.data.images`, the one image reader)


def decode_label(data: bytes, name: str = "<label>") -> np.ndarray:
    """Raw label values of an index image, (H, W) uint8 (or int32 for 16-bit files).

    Palette PNGs give their *indices*, not colours. 8-bit grey and palette PNGs (all of VOC,
    ADE20K, Cityscapes) take the fast path: torchvision's decoder with `UNCHANGED` returns the
    stored bytes, i.e. the indices (checked against PIL on the real VOC files in the tests).
    Other bit depths (e.g. 4-bit palettes, which that path mis-reads) go through PIL.
    """
    is_png = data[:8] == b"\x89PNG\r\n\x1a\n"
    if is_png and len(data) > 26 and data[24] == 8 and data[25] in (0, 3):  # IHDR: depth, colour type
        try:
            tensor = decode_bytes(data, ImageReadMode.UNCHANGED)
        except RuntimeError as e:
            raise DataError(f"{name}: unreadable or truncated label ({e})") from None
        return tensor[0].numpy()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "P", "1", "I", "I;16", "I;16B"):
                raise DataError(f"{name}: label has mode {im.mode!r}; expected a single-channel "
                                "index image (grey or palette PNG), not colours")
            return np.asarray(im, dtype=np.int32 if im.mode.startswith("I") else np.uint8)
    except (OSError, SyntaxError) as e:
        raise DataError(f"{name}: unreadable or truncated label ({e})") from None


def read_label(path: str | Path) -> np.ndarray:
    """The raw values of a label file (see `decode_label`)."""
    try:
        return decode_label(Path(path).read_bytes(), str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: label file is missing") from None


# ------------------------------------------------------------------------------------------
# Raw label values -> training labels


def apply_lut(raw: np.ndarray, lut: np.ndarray, name: str) -> torch.Tensor:
    """Training labels int64 (H, W) from raw values, or a DataError listing the invalid ones."""
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=len(lut)))
    invalid = [int(v) for v in present if v >= len(lut) or lut[v] < 0]
    if invalid:
        raise DataError(f"{name}: label values {describe_values(invalid)} are outside the valid "
                        f"set {describe_values(np.flatnonzero(lut >= 0))}")
    return torch.from_numpy(lut[raw])


# ------------------------------------------------------------------------------------------
# Datasets


class Samples(torch.utils.data.Dataset):
    """What every dataset here shares: `load(i)` gives item `i` (or a DataError naming it),
    `__getitem__` applies the transform, and with `on_bad="skip"` a bad item is replaced by the
    next good one, recorded for `skipped_samples`."""

    def __init__(self, size: int, transform: Callable | None, on_bad: str) -> None:
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.transform, self.on_bad, self.ignore_index = transform, on_bad, IGNORE_INDEX
        self.bad: dict[int, str] = {}  # index -> problem, in this process, with on_bad="skip"
        # one flag per item, in shared memory: DataLoader workers' skips reach the main process
        self.skipped = torch.zeros(size, dtype=torch.bool).share_memory_() \
            if on_bad == "skip" else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        for step in range(len(self)):  # with on_bad="skip": the next good item stands in
            i = (index + step) % len(self)
            if i in self.bad:
                continue
            try:
                image, mask = self.load(i)
                break
            except DataError as e:
                if self.on_bad == "raise":
                    raise
                self.bad[i] = str(e)
                self.skipped[i] = True
                warnings.warn(f"skipping bad sample {i}: {e}", stacklevel=2)
        else:
            raise DataError(f"all {len(self)} samples are bad; first: {next(iter(self.bad.values()))}")
        return self.transform(image, mask) if self.transform is not None else (image, mask)


class SegmentationFiles(Samples):
    """Image / label file pairs and the look-up table that turns raw labels into training labels."""

    def __init__(self, samples: list[tuple[Path, Path]], classes: Sequence[str],
                 palette: Sequence[tuple[int, int, int]], lut: np.ndarray,
                 transform: Callable | None = None, on_bad: str = "raise") -> None:
        super().__init__(len(samples), transform, on_bad)
        self.samples, self.lut = samples, lut
        self.classes, self.palette = tuple(classes), [tuple(c) for c in palette]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        image_path, label_path = self.samples[index]
        return f"image {image_path}, label {label_path}"

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index` without transform; raises DataError for a bad pair."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)                        # (3, H, W) uint8
        mask = apply_lut(read_label(label_path), self.lut, str(label_path))  # (H, W) int64
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise DataError(f"{label_path}: label size {tuple(mask.shape)} differs from image "
                            f"{image_path} size {tuple(image.shape[1:])} (H, W)")
        return image, mask


def skipped_samples(dataset: typing.Any) -> dict[str, str]:
    """{item's files: problem} of every item skipped with `on_bad="skip"` so far, in this process
    and its DataLoader workers, gathered from every rank under torchrun ({} for datasets
    without skipping)."""
    flags = getattr(dataset, "skipped", None)
    local = {}
    if flags is not None:
        for i in flags.nonzero().flatten().tolist():
            problem = dataset.bad.get(i)
            if problem is None:  # found in a worker: read it again here for the message
                try:
                    dataset.load(i)
                    problem = "bad when it was read, readable now"
                except DataError as e:
                    problem = str(e)
            local[dataset.describe(i)] = problem
    from upernet_ref.collectives import all_gather_object
    return {k: v for part in all_gather_object(local) for k, v in part.items()}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {what} (see data/README.md)")
    return path


def _non_empty(samples: list, where: str) -> list:
    if not samples:
        raise DataError(f"{where}: empty split, no images found (see data/README.md)")
    return samples


class VOCSegmentation(SegmentationFiles):
    """PASCAL VOC 2012, root `VOCdevkit/VOC2012`: splits train, val, trainval (masks in
    SegmentationClass) and trainaug (list ImageSets/Segmentation/trainaug.txt, masks in
    SegmentationClassAug, made by `upernet data prepare voc-aug`)."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 on_bad: str = "raise") -> None:
        root = Path(root)
        list_file = _need(root / "ImageSets" / "Segmentation" / f"{split}.txt",
                          f"VOC split list for {split!r}" + (", run `upernet data prepare voc-aug`"
                                                             if split == "trainaug" else ""))
        masks = root / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        samples = [(root / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids]
        voc = DATASETS["voc"]
        super().__init__(_non_empty(samples, str(list_file)), voc.classes, voc.palette,
                         voc.lut(), transform, on_bad)


class ADE20K(SegmentationFiles):
    """ADE20K SceneParsing, root `ADEChallengeData2016`: images/<split>/*.jpg and
    annotations/<split>/*.png (0 = other, 1..150), split "training" or "validation"."""

    def __init__(self, root: str | Path, split: str = "training", reduce_zero_label: bool = True,
                 transform: Callable | None = None, on_bad: str = "raise") -> None:
        root = Path(root)
        images = _need(root / "images" / split, f"ADE20K images for split {split!r}")
        samples = [(p, root / "annotations" / split / f"{p.stem}.png")
                   for p in sorted(images.glob("*.jpg"))]
        # Without reduce-zero-label, 0 "other" is a 151st class (index 0).
        ade = DATASETS["ade20k"]
        lut = ade.lut() if reduce_zero_label else label_lut(151)
        classes = ade.classes if reduce_zero_label else ("other",) + ade.classes
        colours = ade.palette if reduce_zero_label else ((0, 0, 0),) + ade.palette
        super().__init__(_non_empty(samples, str(images)), classes, colours, lut, transform, on_bad)


class Cityscapes(SegmentationFiles):
    """Cityscapes fine annotations, root holding `leftImg8bit/` and `gtFine/`: the official
    `*_gtFine_labelIds.png` mapped to the 19 train ids here, or precomputed
    `*_gtFine_labelTrainIds.png` (`upernet data prepare cityscapes`) with `use_train_ids_file`."""

    def __init__(self, root: str | Path, split: str = "train", use_train_ids_file: bool = False,
                 transform: Callable | None = None, on_bad: str = "raise") -> None:
        root = Path(root)
        images = _need(root / "leftImg8bit" / split, f"Cityscapes images for split {split!r}")
        suffix = "_gtFine_labelTrainIds.png" if use_train_ids_file else "_gtFine_labelIds.png"
        samples = [(p, root / "gtFine" / split / p.parent.name
                    / p.name.replace("_leftImg8bit.png", suffix))
                   for p in sorted(images.glob("*/*_leftImg8bit.png"))]
        city = DATASETS["cityscapes"]
        lut = label_lut(len(city.classes)) if use_train_ids_file else city.lut()
        super().__init__(_non_empty(samples, str(images)), city.classes, city.palette,
                         lut, transform, on_bad)


class FolderDataset(SegmentationFiles):
    """Your own data: images in `image_dir`, index masks `<stem>.png` in `mask_dir`
    (values 0..len(classes)-1 and 255, or 0 = ignore with `reduce_zero_label`)."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, classes: Sequence[str],
                 palette: Sequence[tuple[int, int, int]] | None = None,
                 reduce_zero_label: bool = False, transform: Callable | None = None,
                 on_bad: str = "raise") -> None:
        image_dir, mask_dir = _need(Path(image_dir), "image folder"), Path(mask_dir)
        samples = [(p, mask_dir / f"{p.stem}.png") for p in sorted(image_dir.iterdir())
                   if p.suffix.lower() in IMAGE_SUFFIXES]
        colours = list(palette) if palette is not None else class_palette("folder", len(classes))
        if len(colours) < len(classes):
            raise ValueError(f"palette has {len(colours)} colours for {len(classes)} classes")
        super().__init__(_non_empty(samples, str(image_dir)), classes, colours,
                         label_lut(len(classes), reduce_zero_label), transform, on_bad)


def _find(root: Path, sub: str) -> Path:
    """`root` itself, or `root/sub` when the user pointed at the folder above."""
    return root / sub if (root / sub).is_dir() else root


def open_dataset(name: str, root: str | Path, split: str, *, num_classes: int | None = None,
                 reduce_zero_label: bool | None = None, transform: Callable | None = None,
                 on_bad: str = "raise") -> SegmentationFiles:
    """A dataset on disk by name, as `build_dataset` and `upernet data check` open it.

    `root`: VOCdevkit/VOC2012 (or a folder holding VOCdevkit/), ADEChallengeData2016 (or its
    parent), the Cityscapes folder holding leftImg8bit/ and gtFine/, or a folder dataset's root
    with images/<split>/, masks/<split>/ and classes.txt (one name per line; without it
    `num_classes` names them class_0, class_1, ...). A Hugging Face dataset and the demo scenes
    are not folders of files: the shell opens them (`upernet_ref.sources.dataset_for`).
    """
    root = Path(root)
    dataset = (VOCSegmentation(_find(root, "VOCdevkit/VOC2012"), split, transform, on_bad) if name == "voc"
               else ADE20K(_find(root, "ADEChallengeData2016"), split, reduce_zero_label is not False,
                           transform, on_bad)
               if name == "ade20k" else Cityscapes(root, split, transform=transform, on_bad=on_bad)
               if name == "cityscapes" else None)
    if dataset is not None:
        if num_classes and num_classes < dataset.num_classes:  # labels >= it: a data error
            dataset.lut[(dataset.lut >= num_classes) & (dataset.lut != IGNORE_INDEX)] = -1
            dataset.classes = dataset.classes[:num_classes]
        return dataset
    if name == "folder":
        return FolderDataset(root / "images" / split, root / "masks" / split,
                             names_from_file(root, num_classes, "folder"),
                             reduce_zero_label=bool(reduce_zero_label), transform=transform,
                             on_bad=on_bad)
    raise ValueError(f"unknown dataset {name!r} on disk; use voc, ade20k, cityscapes or folder "
                     f"(hf and demo: `upernet_ref.sources.dataset_for`)")


def names_from_file(root: Path, num_classes: int | None, kind: str) -> list[str]:
    """`root/classes.txt` (one name per line), else class_0, class_1, ... for `num_classes`."""
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [c.strip() for c in names_file.read_text().splitlines() if c.strip()]
        if num_classes and len(names) != num_classes:
            raise ValueError(f"{names_file} names {len(names)} classes, but data.num_classes="
                             f"{num_classes}: give --data.num_classes={len(names)}, or fix the file")
        return names
    if num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    raise ValueError(f"{kind} dataset {root}: write classes.txt or give num_classes")


def build_dataset(cfg, split: str, root: str | Path | None = None,
                  transform: Callable | None = None, on_bad: str = "raise") -> SegmentationFiles:
    """The dataset on disk named by `cfg.data.dataset` ("voc", "ade20k", "cityscapes",
    "folder"); `root` as in `open_dataset`. (A Hugging Face dataset and the embedded demo scenes:
    `upernet_ref.sources.dataset_for`, which the commands use.)"""
    if root is None:
        raise ValueError(f"dataset {cfg.data.dataset!r} needs its folder: --data-root DIR "
                         f"(layouts in data/README.md)")
    return open_dataset(cfg.data.dataset, root, split, num_classes=cfg.data.num_classes,
                        reduce_zero_label=cfg.data.reduce_zero_label, transform=transform,
                        on_bad=on_bad)
