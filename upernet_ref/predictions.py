"""Predictions for image files (`upernet predict`): index PNGs, colour PNGs and overlays.

    upernet predict --checkpoint runs/demo/last.pt --out preds photo.jpg folder/
    upernet predict --checkpoint upernet_r50_ade20k.pth --config upernet_r50_os8_ade20k \
        --test.scales=0.5,0.75,1,1.25,1.5,1.75 --test.flip=true images/

For every image `NAME.ext` it writes into `--out`:
- `NAME.png`: the class index of every pixel (uint8, 8-bit grayscale), at the image's size;
- `NAME_color.png`: the same indices as a palette PNG (opens in colour; indices kept);
- `NAME_overlay.jpg`: the colours blended over the image.

An image found in a folder that was given keeps its path inside that folder (`pin/a/x.jpg`
-> `OUT/a/x.png`, `pin/b/x.jpg` -> `OUT/b/x.png`); an image given as a file goes to the top
of `--out`. Inputs that would write the same output file (`a/x.jpg` and `b/x.jpg` given as
files, `x.jpg` next to `x.png`) are refused before anything is predicted, with their names.

The image goes through the published test pipeline (fitted to the base scale, normalised) and
`inference.predict_labels` with the protocol `cfg.test`, which gives the labels at the image's
own size. An image that cannot be read is reported with its path and skipped; the exit status
is then 1.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from upernet_ref.configs import Config
from upernet_ref.evaluation.inference import predict_labels
from upernet_ref.data.images import IMAGE_SUFFIXES
from upernet_ref.data.info import class_names, class_palette
from upernet_ref.files import atomic_write
from upernet_ref.data.transforms import overlay, test_transform

def find_images(inputs: list[str]) -> list[tuple[Path, str]]:
    """(image, output name) for the files given and the images (by extension, sorted) of every
    folder given, searched recursively.

    The output name is the file's stem, or for an image found in a folder its path inside that
    folder without the extension (`pin/a/x.jpg` -> `a/x`). A file given twice is listed once.
    """
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [(p, p.relative_to(path).with_suffix("").as_posix())
                      for p in sorted(path.rglob("*"))
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            found.append((path, path.stem))  # a missing or unreadable file is reported when read
    unique: dict[tuple[Path, str], tuple[Path, str]] = {}
    for path, name in found:
        unique.setdefault((path.resolve(), name), (path, name))
    return list(unique.values())


def prediction_paths(out_dir: Path, name: str) -> list[Path]:
    """The files written for output name `name`: NAME.png, NAME_color.png, NAME_overlay.jpg."""
    return [out_dir / f"{name}.png", out_dir / f"{name}_color.png", out_dir / f"{name}_overlay.jpg"]


def output_clashes(images: list[tuple[Path, str]], out_dir: Path) -> list[tuple[Path, list[Path]]]:
    """[(output file, the inputs that would all write it)], one entry per group of inputs."""
    writers: dict[Path, list[Path]] = {}
    for path, name in images:
        for out in prediction_paths(out_dir, name):
            writers.setdefault(out, []).append(path)
    clashes: dict[tuple[Path, ...], Path] = {}
    for out, paths in writers.items():
        if len(paths) > 1:
            clashes.setdefault(tuple(paths), out)
    return [(out, list(paths)) for paths, out in clashes.items()]


def describe_prediction(labels: torch.Tensor, classes: list[str]) -> str:
    """`HxW (HxW), classes: sky 61.2%, ground 38.8%` for (H, W) class indices, largest first."""
    h, w = labels.shape
    counts = torch.bincount(labels.flatten().long(), minlength=len(classes)).tolist()
    order = sorted((i for i in range(len(classes)) if counts[i]), key=lambda i: -counts[i])
    shares = ", ".join(f"{classes[i]} {100 * counts[i] / (h * w):.1f}%" for i in order)
    return f"{h}x{w} (HxW), classes: {shares}"


def class_names_and_palette(cfg: Config) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The class names (`data.classes`, else the dataset description's, else class_i) and
    colours of the config's model (no data needed on disk)."""
    n = cfg.data.num_classes
    classes = class_names(cfg.data.dataset, n, cfg.data.classes)
    return list(classes), list(class_palette(cfg.data.dataset, n))


def predict_image(model: torch.nn.Module, image: torch.Tensor, cfg: Config,
                  device: torch.device) -> torch.Tensor:
    """uint8 (H, W) class indices for a uint8 (3, H, W) image, at its own size, with the test
    pipeline of `cfg.data` and the protocol `cfg.test`."""
    h, w = image.shape[-2:]
    normalized, _ = test_transform(cfg.data)(image, None)  # fitted to the base scale
    labels = predict_labels(model, normalized.to(device), cfg.test, out_size=(h, w))
    return labels[0].to(torch.uint8).cpu()  # bounded memory at any image size


def save_prediction(labels: torch.Tensor, image: torch.Tensor,
                    palette: list[tuple[int, int, int]], out_dir: Path, name: str,
                    alpha: float = 0.5) -> list[Path]:
    """Write NAME.png (indices), NAME_color.png (palette PNG) and NAME_overlay.jpg.

    `name` is the output name from `find_images`; it may hold sub-folders (`a/x`).
    """
    paths = prediction_paths(out_dir, name)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    index = labels.numpy().astype(np.uint8)
    # each file whole or not at all (a kill mid-write leaves no broken PNG)
    atomic_write(paths[0], partial(Image.fromarray(index).save, format="PNG"))  # 8-bit grey
    color = Image.fromarray(index)
    flat = [c for rgb in palette for c in rgb]
    color.putpalette(flat + [0] * (768 - len(flat)))  # L -> P, indices unchanged
    atomic_write(paths[1], partial(color.save, format="PNG"))
    blended = overlay(image, labels, palette, alpha)  # (3, H, W) uint8
    atomic_write(paths[2], partial(Image.fromarray(blended.permute(1, 2, 0).numpy()).save,
                                   format="JPEG", quality=90))
    return paths
