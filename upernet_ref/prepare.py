"""Dataset preparation (SBD -> VOC trainaug, Cityscapes train ids) and the dataset check.

- `prepare_voc_aug`: the augmented VOC training set of the paper's VOC numbers
  (docs/SPEC.md, "Data on disk"):
  SBD `cls/*.mat` (MATLAB struct `GTcls.Segmentation`, 0..20) become palette PNGs in
  `VOC2012/SegmentationClassAug/`, except where VOC's own SegmentationClass PNG is copied instead
  (VOC wins where both annotate an image: it has the 255 boundaries the VOC val labels have), and
  `trainaug.txt` = (SBD train + SBD val + VOC train) - VOC val: 10,582 ids on the full data.
- `prepare_cityscapes`: `*_gtFine_labelTrainIds.png` next to every `*_gtFine_labelIds.png`,
  with the same id -> train id table the `Cityscapes` dataset applies on the fly.
- Both keep every output file that already exists (e.g. cityscapesscripts' own train-id files,
  which differ from ours at boundary pixels) unless `overwrite=True`, and write each file under a
  temporary name first, so an interrupted run never leaves a partial file that a rerun would keep.
- `check_pair` / `check_dataset`: per file, what is wrong (missing files, unreadable or truncated
  images, size mismatch, label values outside the valid set). Fast enough for all of ADE20K:
  image sizes come from the header (PIL opens lazily), truncation from the file's last bytes
  (JPEG end-of-image marker, PNG IEND chunk), labels take the fast decode path, and pairs are
  spread over a process pool in chunks.
"""
from __future__ import annotations

import errno
import multiprocessing
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from pathlib import Path
from collections.abc import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from upernet_ref.data.datasets import (DataError, SegmentationFiles, apply_lut, describe_values,
                                      read_label)
from upernet_ref.data.info import DATASETS, voc_colormap
from upernet_ref.data.images import read_image
from upernet_ref.extras import require
from upernet_ref.files import atomic_write


def parallel_map(fn: Callable, items: list, workers: int, desc: str, progress: bool = True) -> list:
    """`[fn(x) for x in items]` over a process pool (workers > 1) with a tqdm bar on stderr."""
    bar = dict(total=len(items), desc=desc, file=sys.stderr, disable=not progress, unit="file")
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in tqdm(items, **bar)]
    chunksize = max(1, min(64, len(items) // (4 * workers)))
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, items, chunksize=chunksize), **bar))


# ------------------------------------------------------------------------------------------
# Checks


def image_truncated(path: Path) -> bool:
    """Cheap truncation test from the last bytes: JPEG ends with EOI (FF D9), PNG with IEND."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 1024))
        tail = f.read()
    if head[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in tail
    if head == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail[-64:]
    with Image.open(path) as im:  # other formats: PIL's structural check
        im.verify()
    return False


def check_pair(pair: tuple[Path, Path], lut: np.ndarray,
               decode_images: bool = False) -> tuple[list[tuple[str, str]], np.ndarray | None]:
    """Problems `[(kind, message)]` of one image / label pair and its raw label histogram."""
    image_path, label_path = pair
    problems: list[tuple[str, str]] = []
    size, truncated = None, False
    if not image_path.exists():
        problems.append(("missing image", f"{image_path}: image file is missing"))
    else:
        try:
            truncated = image_truncated(image_path)
            if truncated:
                problems.append(("truncated image", f"{image_path}: image is truncated"))
            with Image.open(image_path) as im:
                size = im.size[::-1]  # (H, W) from the header only
            if decode_images and not truncated:
                read_image(image_path)
        except (OSError, SyntaxError, DataError) as e:
            if not truncated:
                problems.append(("unreadable image", f"{image_path}: unreadable image ({e})"))
    if not label_path.exists():
        problems.append(("missing label", f"{label_path}: label file is missing"))
        return problems, None
    try:
        raw = read_label(label_path)
    except DataError as e:
        problems.append(("unreadable label", str(e)))
        return problems, None
    if size is not None and tuple(raw.shape) != tuple(size):
        problems.append(("size mismatch", f"{label_path}: label size {tuple(raw.shape)} differs "
                                          f"from image {image_path.name} size {tuple(size)} (H, W)"))
    histogram = np.bincount(raw.ravel(), minlength=256)
    invalid = [v for v in np.flatnonzero(histogram) if v >= len(lut) or lut[v] < 0]
    if invalid:
        problems.append(("invalid label values", f"{label_path}: label values "
                         f"{describe_values(invalid)} are outside the valid set "
                         f"{describe_values(np.flatnonzero(lut >= 0))}"))
    return problems, histogram[:256]


def check_dataset(dataset: SegmentationFiles, workers: int = 1, decode_images: bool = False,
                  progress: bool = True, desc: str = "check"
                  ) -> tuple[list[tuple[str, str]], np.ndarray]:
    """All problems of a dataset's pairs and the summed raw label histogram (256 bins)."""
    fn = partial(check_pair, lut=dataset.lut, decode_images=decode_images)
    results = parallel_map(fn, list(dataset.samples), workers, desc, progress)
    problems = [p for found, _ in results for p in found]
    histogram = sum((h for _, h in results if h is not None), np.zeros(256, dtype=np.int64))
    return problems, histogram


# ------------------------------------------------------------------------------------------
# Preparation


@dataclass
class Prepared:
    """The files a `prepare_*` call wrote, and those it kept because they existed already."""
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def _unwritable(error: OSError, path: Path) -> DataError:
    """An OSError of writing `path` as a DataError that names the file (and pickles whole)."""
    hint = ""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = (f"; the folder {path.parent} is not writable (fix its permissions, or prepare "
                "a writable copy of the dataset)")
    return DataError(f"{path}: cannot write ({error.strerror or error}){hint}")


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """`files.atomic_write`: a file at `path` is always complete; an OSError names the file."""
    try:
        atomic_write(path, write)
    except OSError as error:
        raise _unwritable(error, path) from None


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise _unwritable(error, folder) from None


def _split_existing(outputs: list, overwrite: bool, key: Callable = lambda out: out
                    ) -> tuple[list, list[Path]]:
    """(the `outputs` to write, the paths of those that exist and are kept unless `overwrite`)."""
    exists = [not overwrite and key(out).exists() for out in outputs]
    return ([out for out, e in zip(outputs, exists) if not e],
            [key(out) for out, e in zip(outputs, exists) if e])


def _read_ids(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (see data/README.md)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def convert_sbd_mat(paths: tuple[Path, Path]) -> None:
    """One SBD `cls/<id>.mat` (struct GTcls, field Segmentation, 0..20) -> palette PNG."""
    mat_path, png_path = paths
    loadmat = require("scipy.io", "prepare", "upernet data prepare voc-aug (SBD .mat files)").loadmat
    try:
        seg = loadmat(mat_path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise DataError(f"{mat_path}: not an SBD class file with GTcls.Segmentation ({e})") from None
    seg = np.asarray(seg)
    values = np.unique(seg)
    if seg.ndim != 2 or values.min() < 0 or values.max() > 20:
        raise DataError(f"{mat_path}: expected a 2-D map of values 0..20, got shape "
                        f"{seg.shape} and values {describe_values(values)}")
    image = Image.fromarray(seg.astype(np.uint8))  # "L"; putpalette makes it "P"
    image.putpalette([c for rgb in voc_colormap() for c in rgb])
    write_file(png_path, partial(image.save, format="PNG"))


def prepare_voc_aug(voc_root: str | Path, sbd_root: str | Path, workers: int = 1,
                    progress: bool = True, overwrite: bool = False) -> tuple[list[str], Prepared]:
    """Build SegmentationClassAug/ and ImageSets/Segmentation/trainaug.txt.

    Existing files there are kept unless `overwrite`. Returns the trainaug ids computed (those
    in a kept trainaug.txt may differ) and the files written and kept.
    """
    require("scipy.io", "prepare", "upernet data prepare voc-aug (SBD .mat files)")  # before the pool
    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    lists = voc_root / "ImageSets" / "Segmentation"
    voc_train, voc_val = _read_ids(lists / "train.txt"), _read_ids(lists / "val.txt")
    sbd_ids = _read_ids(sbd_root / "train.txt") + _read_ids(sbd_root / "val.txt")
    out = voc_root / "SegmentationClassAug"
    mats = sorted((sbd_root / "cls").glob("*.mat"))
    if not mats:
        raise DataError(f"{sbd_root / 'cls'}: no .mat files (expected benchmark_RELEASE/dataset)")
    _mkdir(out)
    # VOC's label wins where both annotate an image, so SBD is converted only for the others:
    # no file is written twice, and a rerun after an interruption cannot keep an SBD label there.
    voc_pngs = sorted((voc_root / "SegmentationClass").glob("*.png"))
    voc_ids = {png.stem for png in voc_pngs}
    destination = itemgetter(1)  # (source, destination) pairs
    copies, kept_copies = _split_existing([(png, out / png.name) for png in voc_pngs], overwrite,
                                          key=destination)
    conversions, kept_mats = _split_existing([(m, out / f"{m.stem}.png") for m in mats
                                              if m.stem not in voc_ids], overwrite, key=destination)
    for png, dst in copies:
        write_file(dst, partial(shutil.copyfile, png))
    parallel_map(convert_sbd_mat, conversions, workers, "SBD .mat -> png", progress)
    done = Prepared([dst for _, dst in copies + conversions], kept_copies + kept_mats)
    ids = sorted(set(sbd_ids + voc_train) - set(voc_val))
    missing = [f"{i}: " + " and ".join(what for what, p in (
        ("no label", out / f"{i}.png"), ("no image", voc_root / "JPEGImages" / f"{i}.jpg"))
        if not p.exists()) for i in ids
        if not (out / f"{i}.png").exists() or not (voc_root / "JPEGImages" / f"{i}.jpg").exists()]
    if missing:
        raise DataError(f"{len(missing)} trainaug ids lack files, e.g. " + "; ".join(missing[:5]))
    trainaug = lists / "trainaug.txt"
    if trainaug.exists() and not overwrite:
        done.skipped.append(trainaug)
    else:
        write_file(trainaug, lambda tmp: tmp.write_text("".join(f"{i}\n" for i in ids)))
        done.written.append(trainaug)
    return ids, done


def train_ids_path(label_path: Path) -> Path:
    """`*_gtFine_labelTrainIds.png` for a `*_gtFine_labelIds.png`."""
    return label_path.with_name(label_path.name.replace("_labelIds.png", "_labelTrainIds.png"))


def _write_train_ids(label_path: Path) -> None:
    lut = DATASETS["cityscapes"].lut()
    train_ids = apply_lut(read_label(label_path), lut, str(label_path)).numpy().astype(np.uint8)
    image = Image.fromarray(train_ids)  # 8-bit grey
    write_file(train_ids_path(label_path), partial(image.save, format="PNG"))


def prepare_cityscapes(root: str | Path, workers: int = 1, progress: bool = True,
                       overwrite: bool = False) -> Prepared:
    """Write `*_gtFine_labelTrainIds.png` next to each `*_gtFine_labelIds.png`.

    Existing train-id files are kept unless `overwrite`: cityscapesscripts' own differ from
    ours at about 0.4% of pixels (object boundaries), and a rerun should not replace them.
    """
    files = sorted((Path(root) / "gtFine").glob("*/*/*_gtFine_labelIds.png"))
    if not files:
        raise DataError(f"{Path(root) / 'gtFine'}: no */*/*_gtFine_labelIds.png files found")
    todo, kept = _split_existing(files, overwrite, key=train_ids_path)
    parallel_map(_write_train_ids, todo, workers, "labelIds -> labelTrainIds", progress)
    return Prepared([train_ids_path(f) for f in todo], kept)
