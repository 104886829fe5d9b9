"""Images per second per CPU core for the published train pipeline, decoding included.

Writes an ADE20K-like pair (683x512 JPEG + 8-bit PNG label) and a Cityscapes-like pair
(2048x1024 PNG + PNG label) to a temporary folder, then in one process with one thread
(= one core) times: read + decode (torchvision.io) -> `train_transform(data_cfg)`, with each
dataset's published data config. The figure is images / CPU-second of this process, so other
load on the machine does not change it much; wall-clock is printed beside it.

    python benchmarks/data_pipeline.py [--iters 40]

Divide a GPU's training throughput (images/s) by this figure to get the number of DataLoader
workers (cores) it needs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png, read_file, write_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from upernet_ref.data import transforms as T  # noqa: E402
from upernet_ref.configs import get_config  # noqa: E402
from upernet_ref.demo_scenes import DemoScenes


def make_pair(folder: Path, name: str, size: tuple[int, int], image_format: str, num_classes: int):
    """A scene of `size` (h, w) written as image + label files; returns their paths.

    The scene is drawn at 1/4 size and upsampled, so its files compress like photos
    (~70 KiB JPEG at 683x512, ~2.3 MiB PNG at 2048x1024; real ADE20K / Cityscapes files are
    ~20-50 KiB and ~2.1 MiB).
    """
    small = DemoScenes("test", num_samples=1, size=(size[0] // 4, size[1] // 4), seed=1)[0]
    image, mask = T.resize_pair(small[0], small[1].to(torch.uint8), size)
    # Spread the 8 demo labels over the dataset's label range so crops see many classes.
    mask = mask.long()
    mask = torch.where(mask == 255, mask, (mask * 37 + torch.arange(size[1]) // 64) % num_classes)
    image_path = folder / f"{name}.{image_format}"
    data = encode_jpeg(image, quality=90) if image_format == "jpg" else encode_png(image)
    write_file(str(image_path), data)
    label_path = folder / f"{name}_label.png"
    write_file(str(label_path), encode_png(mask.to(torch.uint8)[None]))
    return image_path, label_path


def load(image_path: Path, label_path: Path):
    image = decode_image(read_file(str(image_path)), mode=ImageReadMode.RGB)  # uint8 (3, H, W)
    mask = decode_image(read_file(str(label_path)))[0].long()                 # int64 (H, W)
    return image, mask


def timed(fn, iters: int):
    """(CPU seconds, wall seconds) per call of fn over `iters` calls."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.process_time() - cpu) / iters, (time.perf_counter() - wall) / iters


def bench(name: str, config: str, size: tuple[int, int], image_format: str, iters: int,
          folder: Path) -> None:
    data_cfg = get_config(config).data
    paths = make_pair(folder, name, size, image_format, data_cfg.num_classes)
    transform = T.train_transform(data_cfg)
    _ = torch.manual_seed(0)
    image, mask = load(*paths)
    transform(image, mask)  # warm-up

    cpu, wall = timed(lambda: transform(*load(*paths)), iters)
    kb = sum(p.stat().st_size for p in paths) / 1024
    print(f"{name:<11} {size[1]}x{size[0]} {image_format.upper():<4} ({kb:.0f} KiB)  "
          f"crop {data_cfg.crop_size[0]}x{data_cfg.crop_size[1]}:  "
          f"{1 / cpu:6.1f} images/s per core   ({1 / wall:.1f}/s wall)")

    # Where the time goes: each step on its own (same order and sizes as the pipeline).
    c = data_cfg
    u8, m8 = T.check_pair(image, mask)
    big, big_m = T.random_rescale(u8, m8, c.base_scale, c.ratio_range)
    crop, crop_m = T.random_crop(big, big_m, c.crop_size, c.cat_max_ratio, c.ignore_index)
    flat = crop.float()
    steps = {
        "decode": lambda: load(*paths),
        "rescale": lambda: T.random_rescale(u8, m8, c.base_scale, c.ratio_range),
        "crop": lambda: T.random_crop(big, big_m, c.crop_size, c.cat_max_ratio, c.ignore_index),
        "flip": lambda: T.random_hflip(crop, crop_m, c.flip_prob),
        "photometric": lambda: T.photometric_distortion(crop),
        "normalize+pad": lambda: T.pad_to(T.normalize(flat, c.mean, c.std), crop_m, c.crop_size),
    }
    parts = {k: timed(f, iters)[0] * 1e3 for k, f in steps.items()}
    print("            ms per image: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40, help="images per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core
    print(f"torch {torch.__version__}, 1 thread, {args.iters} images each; full train pipeline "
          "with decode (rescale x U(0.5, 2), cat_max_ratio crop, flip, photometric, normalize, pad)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench("ADE20K", "upernet_r50_os8_ade20k", (512, 683), "jpg", args.iters, folder)
        bench("Cityscapes", "upernet_r50_os8_cityscapes", (1024, 2048), "png", args.iters, folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
