"""Tiny fake VOC / SBD / ADE20K / Cityscapes / folder datasets in the exact on-disk layouts.

Each `make_fake_*` writes random but reproducible images and label files under `root` and
returns the folder a dataset class takes as its root. Labels are blocky (4x4 cells) so JPEG
images and PNG labels stay small; every label value of the dataset's valid set can appear.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from upernet_ref.data.info import voc_colormap

SIZE = (24, 32)  # (H, W) of every fake image


def _blocks(rng: np.random.Generator, values: np.ndarray, size=SIZE) -> np.ndarray:
    """A (H, W) uint8 map of values drawn per 4x4 cell."""
    cells = rng.choice(values, size=(size[0] // 4, size[1] // 4)).astype(np.uint8)
    return np.kron(cells, np.ones((4, 4), dtype=np.uint8))


def _image(rng: np.random.Generator, path: Path, size=SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def save_index_png(array: np.ndarray, path: Path, palette: bool = False) -> None:
    """A grey ("L") or VOC-palette ("P") PNG of label indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8))
    if palette:
        image.putpalette([c for rgb in voc_colormap() for c in rgb])
    image.save(path)


def make_fake_voc(root: Path, n: int = 6, seed: int = 0) -> Path:
    """VOCdevkit/VOC2012 with n pairs; train = first half of the ids, val = the rest."""
    rng, voc = np.random.default_rng(seed), Path(root) / "VOCdevkit" / "VOC2012"
    ids = [f"2008_{i:06d}" for i in range(n)]
    for i in ids:
        _image(rng, voc / "JPEGImages" / f"{i}.jpg")
        label = _blocks(rng, np.r_[0:21, 255])
        save_index_png(label, voc / "SegmentationClass" / f"{i}.png", palette=True)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for split, part in (("train", ids[:half]), ("val", ids[half:]), ("trainval", ids)):
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in part))
    return voc


def make_fake_sbd(root: Path, voc: Path, ids_train: list[str], ids_val: list[str],
                  seed: int = 1) -> Path:
    """benchmark_RELEASE/dataset: cls/<id>.mat (struct GTcls.Segmentation, 0..20), train/val lists.

    Ids without a VOC image get one in `voc/JPEGImages` (SBD images are VOC 2011 images).
    """
    rng, sbd = np.random.default_rng(seed), Path(root) / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    for i in ids_train + ids_val:
        seg = _blocks(rng, np.arange(21))
        gtcls = {"Segmentation": seg, "Boundaries": np.zeros((21, 1), dtype=object),
                 "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}
        scipy.io.savemat(sbd / "cls" / f"{i}.mat", {"GTcls": gtcls})
        if not (voc / "JPEGImages" / f"{i}.jpg").exists():
            _image(rng, voc / "JPEGImages" / f"{i}.jpg")
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in ids_train))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in ids_val))
    return sbd


def make_fake_ade20k(root: Path, n: int = 4, seed: int = 0) -> Path:
    """ADEChallengeData2016 with n training and max(1, n // 2) validation pairs (labels 0..150)."""
    rng, ade = np.random.default_rng(seed), Path(root) / "ADEChallengeData2016"
    for split, prefix, count in (("training", "train", n), ("validation", "val", max(1, n // 2))):
        for k in range(1, count + 1):
            _image(rng, ade / "images" / split / f"ADE_{prefix}_{k:08d}.jpg")
            label = _blocks(rng, np.arange(151))
            save_index_png(label, ade / "annotations" / split / f"ADE_{prefix}_{k:08d}.png")
    return ade


def make_fake_cityscapes(root: Path, n: int = 4, seed: int = 0) -> Path:
    """leftImg8bit/ and gtFine/ with n train pairs (two cities) and 2 val pairs; labelIds 0..33."""
    rng, city = np.random.default_rng(seed), Path(root) / "cityscapes"
    for split, count, cities in (("train", n, ("aachen", "bremen")), ("val", 2, ("frankfurt",))):
        for k in range(count):
            town = cities[k % len(cities)]
            stem = f"{town}_{k:06d}_000019"
            _image(rng, city / "leftImg8bit" / split / town / f"{stem}_leftImg8bit.png")
            label = _blocks(rng, np.arange(34))
            save_index_png(label, city / "gtFine" / split / town / f"{stem}_gtFine_labelIds.png")
    return city


def make_fake_folder(root: Path, classes=("bg", "cat", "dog"), n: int = 3, seed: int = 0) -> Path:
    """images/{train,val}/*.jpg + masks/{train,val}/*.png (0..C-1, 255) + classes.txt."""
    rng, folder = np.random.default_rng(seed), Path(root) / "mydata"
    for split in ("train", "val"):
        for k in range(n):
            _image(rng, folder / "images" / split / f"img{k}.jpg")
            label = _blocks(rng, np.r_[0:len(classes), 255])
            save_index_png(label, folder / "masks" / split / f"img{k}.png")
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return folder
