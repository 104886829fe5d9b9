"""`upernet predict`: segmentation maps for images, as index PNGs, colour PNGs and overlays.

    upernet predict --checkpoint runs/demo/last.pt --out preds photo.jpg folder/
    upernet predict --checkpoint upernet_r50_ade20k.pth --config upernet_r50_os8_ade20k \
        --scales 0.5,0.75,1,1.25,1.5,1.75 --flip images/

For every image `NAME.ext` it writes into `--out`:
- `NAME.png`: the class index of every pixel (uint8, 8-bit grayscale), at the image's size;
- `NAME_color.png`: the same indices as a palette PNG (opens in colour; indices kept);
- `NAME_overlay.jpg`: the colours blended over the image.

The image goes through the published test pipeline (fitted to the base scale, normalised) and
`inference.inference`, whose probabilities are resized back to the image's own size. An image
that cannot be read is reported with its path and skipped; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .configs import Config
from .distributed import resolve_device
from .evaluate import add_inference_arguments, load_model
from .inference import inference
from .transforms import overlay, test_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def find_images(inputs: list[str]) -> list[Path]:
    """Files as given, and the images (by extension, sorted) of every folder given."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(path)  # a missing or unreadable file is reported when it is read
    return paths


def read_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor of an image file, or a ValueError naming the file."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as error:  # PIL.UnidentifiedImageError, truncated files, ...
        raise ValueError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def class_names_and_palette(cfg: Config) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The class names and colours of the config's dataset (no data needed on disk).

    A "folder" dataset (or any other) gets `class_i` names and a fixed pseudo-random palette.
    """
    name, n = cfg.data.dataset, cfg.data.num_classes
    if name == "demo":
        from .synthetic import DEMO_CLASSES as classes, DEMO_PALETTE as palette
    elif name in ("voc", "ade20k", "cityscapes"):
        from . import dataset_classes
        classes = getattr(dataset_classes, f"{name.upper()}_CLASSES")
        palette = getattr(dataset_classes, f"{name.upper()}_PALETTE")
    else:
        gen = torch.Generator().manual_seed(0)
        classes = [f"class_{i}" for i in range(n)]
        palette = torch.randint(0, 256, (n, 3), generator=gen).tolist()
    if len(classes) != n or len(palette) < n:
        raise ValueError(f"config {cfg.name} has {n} classes but dataset {name!r} names "
                         f"{len(classes)} (palette {len(palette)})")
    return list(classes), [tuple(int(c) for c in rgb) for rgb in palette[:n]]


def predict_image(model: torch.nn.Module, image: torch.Tensor, cfg: Config,
                  device: torch.device, **options) -> torch.Tensor:
    """uint8 (H, W) class indices for a uint8 (3, H, W) image, at its own size."""
    h, w = image.shape[-2:]
    normalized, _ = test_transform(cfg.data)(image, None)  # fitted to the base scale
    probs = inference(model, normalized.to(device), cfg.test, out_size=(h, w), **options)
    return probs.argmax(1)[0].to(torch.uint8).cpu()


def save_prediction(labels: torch.Tensor, image: torch.Tensor,
                    palette: list[tuple[int, int, int]], out_dir: Path, stem: str,
                    alpha: float = 0.5) -> list[Path]:
    """Write NAME.png (indices), NAME_color.png (palette PNG) and NAME_overlay.jpg."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = labels.numpy().astype(np.uint8)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}_color.png", out_dir / f"{stem}_overlay.jpg"]
    Image.fromarray(index).save(paths[0])  # 2-D uint8: 8-bit grayscale
    color = Image.fromarray(index)
    flat = [c for rgb in palette for c in rgb]
    color.putpalette(flat + [0] * (768 - len(flat)))  # L -> P, indices unchanged
    color.save(paths[1])
    blended = overlay(image, labels, palette, alpha)  # (3, H, W) uint8
    Image.fromarray(blended.permute(1, 2, 0).numpy()).save(paths[2], quality=90)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet predict", description=__doc__.split("\n")[0])
    add_inference_arguments(parser)
    parser.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, and folders searched recursively for images")
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device)
        model, cfg = load_model(args, device)
        classes, palette = class_names_and_palette(cfg)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"upernet predict: error: {error}", file=sys.stderr)
        return 2
    model.to(device).eval()
    paths = find_images(args.inputs)
    if not paths:
        print(f"upernet predict: error: no images found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    options = dict(mode=args.mode, scales=args.scales, flip=args.flip, crop_size=args.crop,
                   stride=args.stride)
    failed = []
    for path in paths:
        try:
            image = read_image(path)
        except ValueError as error:
            print(f"upernet predict: error: {error}", file=sys.stderr)
            failed.append(path)
            continue
        labels = predict_image(model, image, cfg, device, **options)
        save_prediction(labels, image, palette, out_dir, path.stem, args.alpha)
        present = ", ".join(classes[i] for i in labels.unique().tolist() if i < len(classes))
        print(f"{path} -> {out_dir / path.stem}.png  ({tuple(labels.shape)}; {present})")
    done = len(paths) - len(failed)
    print(f"{done} of {len(paths)} images predicted into {out_dir}")
    if failed:
        print(f"upernet predict: {len(failed)} image(s) could not be read: "
              f"{', '.join(str(p) for p in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
