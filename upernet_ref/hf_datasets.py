"""Hugging Face `datasets` as segmentation datasets (the optional [hf] extra): a
`datasets.save_to_disk` folder, a Hub dataset id, or a `datasets.Dataset` in memory.

Part of the shell: the reading core opens folders of files (`data/datasets.py`); this adapter
gives a Hugging Face dataset the same data contract (item `i` is `(image, mask)`, uint8
(3, H, W) RGB and int64 (H, W) training labels or 255, or `transform(image, mask)`; docs/DESIGN.md),
through the same look-up tables (`data/info.py: label_lut`) and the same `Samples` base (bad
rows raise or, with `on_bad="skip"`, are replaced). `sources.dataset_for` opens it for
`--data.dataset=hf`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from upernet_ref.data.datasets import Samples, apply_lut, names_from_file
from upernet_ref.data.images import pil_to_rgb
from upernet_ref.data.info import DATASETS, class_palette, label_lut
from upernet_ref.errors import DataError, UsageError
from upernet_ref.extras import require

_log = logging.getLogger(__name__)


def check_features(hf_dataset, columns: dict[str, str], where: str) -> None:
    """Each column exists and holds images (the `datasets` feature Image, or Array3D / Array2D),
    else a ValueError naming the column, the feature type found and the one expected."""
    features, names = getattr(hf_dataset, "features", None) or {}, hf_dataset.column_names
    for option, column in columns.items():
        expected = ("Image", "Array3D" if option == "image" else "Array2D")
        if column not in names or (column in features and type(features[column]).__name__ not in expected):
            what = (f"column {column!r} holds {features[column]}, expected {' or '.join(expected)} ({option}s)"
                    if column in names else f"no column {column!r} (columns: {', '.join(names)})")
            raise ValueError(f"{where}: {what}; set --data.hf_{option}_column")


class HFSegmentation(Samples):
    """A Hugging Face `datasets.Dataset` with PIL image and annotation columns (e.g. the
    scene_parse_150 layout: annotation 0 = other, so `reduce_zero_label=True`). `source` names
    it in messages (`open_hf_dataset`: the folder or Hub id and the split)."""

    def __init__(self, hf_dataset, classes: Sequence[str] = DATASETS["ade20k"].classes,
                 image_column: str = "image", annotation_column: str = "annotation",
                 reduce_zero_label: bool = True, palette: Sequence[tuple[int, int, int]] | None = None,
                 transform: Callable | None = None, on_bad: str = "raise",
                 source: str | None = None) -> None:
        if not hasattr(hf_dataset, "__len__"):  # datasets.IterableDataset (streaming=True)
            raise UsageError("a streaming Hugging Face dataset (IterableDataset) is not "
                             "supported: training's sampler and evaluation need its length; "
                             "load it without streaming=True, or save_to_disk a part of it")
        name = getattr(getattr(hf_dataset, "info", None), "dataset_name", None) or "<in memory>"
        self.source = source or f"Hugging Face dataset {name}"
        check_features(hf_dataset, {"image": image_column, "annotation": annotation_column}, self.source)
        super().__init__(len(hf_dataset), transform, on_bad)
        self.hf_dataset = hf_dataset
        self.image_column, self.annotation_column = image_column, annotation_column
        self.classes = tuple(classes)
        self.palette = list(palette) if palette is not None else list(
            class_palette("ade20k", len(classes)))
        self.lut = label_lut(len(classes), reduce_zero_label)

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def describe(self, index: int) -> str:
        return f"{self.source} row {index}"

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `index` without transform; raises DataError naming the row and column."""
        row, where = self.hf_dataset[index], self.describe(index)
        image, ann = row[self.image_column], row[self.annotation_column]
        image = (pil_to_rgb(image, where) if isinstance(image, Image.Image)  # (3, H, W)
                 else torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))))
        raw = np.asarray(ann)
        if (isinstance(ann, Image.Image) and ann.mode not in ("L", "P", "I", "I;16")) or raw.ndim != 2:
            raise DataError(f"{where}: column {self.annotation_column!r} is not a map of class indices "
                            f"({type(ann).__name__} {getattr(ann, 'mode', '')}, shape {raw.shape})")
        mask = apply_lut(raw, self.lut, where)  # (H, W) int64
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise DataError(f"{where}: annotation size {tuple(mask.shape)} differs "
                            f"from image size {tuple(image.shape[1:])}")
        return image, mask


_SPLIT_ALIASES = {"val": "validation", "validation": "val"}  # HF names it "validation"


def _pick_split(have: Sequence[str], split: str, where: str) -> str:
    """`split`, or its alias (val <-> validation) when only that exists (said in one line)."""
    if split in have:
        return split
    alias = _SPLIT_ALIASES.get(split)
    if alias in have:
        _log.info(f"note: {where} has no split {split!r}: using {alias!r}")
        return alias
    raise ValueError(f"{where}: no split {split!r} (it has {', '.join(have)}); choose with "
                     f"--data.train_split / --data.val_split")


def _hf_class_names(data, path: Path, num_classes: int | None, reduce_zero_label: bool) -> list[str]:
    """classes.txt beside the folder, else a ClassLabel feature with the model's classes (plus
    "other" first with reduce_zero_label), else ADE20K's for 150 classes, else class_i."""
    if (path / "classes.txt").is_file():
        return names_from_file(path, num_classes, "Hugging Face")
    for feature in data.features.values():
        names = list(getattr(feature, "names", None) or [])
        if names and reduce_zero_label:
            names = names[1:]
        if names and (num_classes is None or len(names) == num_classes):
            return names
    if num_classes == 150:
        return list(DATASETS["ade20k"].classes)
    return names_from_file(path, num_classes, "Hugging Face")


def open_hf_dataset(root: str, split: str, *, num_classes: int | None = None,
                    reduce_zero_label: bool = True, image_column: str = "image",
                    annotation_column: str = "annotation", config: str = "",
                    revision: str = "", transform: Callable | None = None,
                    on_bad: str = "raise") -> HFSegmentation:
    """A Hugging Face dataset as `HFSegmentation`: `root` is a `datasets.save_to_disk` folder of
    a `DatasetDict` (one entry per split), or, when no such folder exists, a Hub dataset name
    (`datasets.load_dataset(root, config, revision=revision, split=split)`, needs the network or
    the cache). "val" finds "validation" (and back) when only that split exists. Class names:
    `_hf_class_names`."""
    datasets = require("datasets", "hf", "a Hugging Face dataset")
    path = Path(root)
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as err:  # FileNotFoundError for a folder without dataset_dict.json, ...
            raise ValueError(f"{path}: not a datasets.save_to_disk folder "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
        if not isinstance(data, datasets.DatasetDict):
            raise ValueError(f"{path}: holds one Dataset without splits; save a DatasetDict, "
                             f"e.g. DatasetDict(train=..., validation=...).save_to_disk(DIR)")
        if not data:
            raise ValueError(f"{path}: an empty DatasetDict (no splits); save one with the splits, "
                             f"e.g. DatasetDict(train=..., validation=...).save_to_disk(DIR)")
        data = data[_pick_split(list(data), split, str(path))]
    elif path.exists():
        raise ValueError(f"{path}: not a folder (a Hugging Face dataset is a save_to_disk "
                         f"folder or a Hub name)")
    else:
        where = f"{root}{f' ({config})' if config else ''}"
        try:
            names = datasets.get_dataset_split_names(root, config or None,
                                                     revision=revision or None)
            data = datasets.load_dataset(root, config or None, revision=revision or None,
                                         split=_pick_split(names, split, where))
        except ValueError as err:
            if "no split" in str(err):
                raise
            raise ValueError(f"{where}: {(str(err).splitlines() or [''])[0][:200]}") from None
        except Exception as err:
            raise ValueError(f"{where}: no such folder, and loading it as a Hugging Face Hub "
                             f"dataset failed: {type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0][:160]} (offline: use a "
                             f"save_to_disk folder, or the cache with HF_HUB_OFFLINE=1)") from None
        path = Path(".")  # no classes.txt beside a Hub dataset
    classes = _hf_class_names(data, path, num_classes, reduce_zero_label)
    return HFSegmentation(data, classes, image_column, annotation_column, reduce_zero_label,
                          transform=transform, on_bad=on_bad, source=f"{root} split {split!r}")
