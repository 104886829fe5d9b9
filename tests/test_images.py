"""The one image reader (`upernet_ref.data.images`): every common layout read as meant."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_ref.data.images import IMAGE_SUFFIXES, decode_rgb, read_image
from upernet_ref.errors import DataError

RNG = np.random.default_rng(0)
RGB = np.kron(RNG.integers(0, 256, (6, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # (24, 32, 3)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_rgb16(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def as_hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_rgb_files_read_exactly(fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    assert (as_hwc(decode_rgb(encode(Image.fromarray(RGB), fmt, **kw))) == RGB).all()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_grey_palette_and_rgba_become_their_rgb(fmt):
    grey = Image.fromarray(RGB).convert("L")
    assert (as_hwc(decode_rgb(encode(grey, fmt))) == np.asarray(grey)[..., None]).all()
    palette = Image.fromarray(RGB).quantize(16)
    assert (as_hwc(decode_rgb(encode(palette, fmt))) == np.asarray(palette.convert("RGB"))).all()
    if fmt != "BMP":
        rgba = Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)]), "RGBA")
        assert (as_hwc(decode_rgb(encode(rgba, fmt))) == RGB).all()  # alpha dropped


def test_sixteen_bit_images_are_scaled_not_clipped():
    grey16 = (RGB[..., 0].astype(np.uint16) * 257)  # 8-bit values stretched to 16 bits
    for fmt in ("PNG", "TIFF"):
        got = as_hwc(decode_rgb(encode(Image.fromarray(grey16), fmt)))
        assert (got == RGB[..., :1]).all(), fmt  # not all white (PIL's convert("RGB") clips)
    got = as_hwc(decode_rgb(png_rgb16(np.minimum(RGB.astype(np.int64) * 257 + 100, 65535))))
    assert (got == RGB).all()


def test_cmyk_jpeg_and_tiff_read_as_rgb():
    cmyk = Image.fromarray(RGB).convert("CMYK")
    assert np.abs(as_hwc(decode_rgb(encode(cmyk, "TIFF"))) - RGB).max() <= 1
    jpeg = as_hwc(decode_rgb(encode(cmyk, "JPEG", quality=95)))
    assert np.abs(jpeg - RGB).mean() < 6  # JPEG loss only: not inverted, not channel-swapped


def test_unreadable_files_are_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="x.png: image file is missing"):
        read_image(tmp_path / "x.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="notes.png: unreadable or truncated image"):
        read_image(tmp_path / "notes.png")
    truncated = encode(Image.fromarray(RGB), "PNG")[:200]
    with pytest.raises(DataError, match="t.png: unreadable or truncated"):
        decode_rgb(truncated, "t.png")
    floats = encode(Image.fromarray(RNG.random((8, 8)).astype(np.float32)), "TIFF")
    with pytest.raises(DataError, match="f.tif: a floating-point image"):
        decode_rgb(floats, "f.tif")


def test_one_list_of_suffixes_for_datasets_and_predict():
    from upernet_ref.data import datasets
    from upernet_ref import predictions as predict
    assert datasets.IMAGE_SUFFIXES is IMAGE_SUFFIXES and predict.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert {".bmp", ".tif", ".tiff", ".png", ".jpg"} <= set(IMAGE_SUFFIXES)


def make_bmp_tif_folder(root, n: int = 4):
    """A folder dataset (3 classes) whose images are .bmp and .tif files."""
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("sky\nground\nthing\n")
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            image = Image.fromarray(np.roll(RGB, i, axis=1))
            image.save(root / "images" / split / f"{i}{'.bmp' if i % 2 else '.tif'}")
            Image.fromarray((np.arange(32)[None].repeat(24, 0) // 11).astype(np.uint8)).save(
                root / "masks" / split / f"{i}.png")
    return root


def test_a_folder_dataset_of_bmp_and_tif_images_trains_and_evaluates(tmp_path):
    from upernet_ref.configs import get_config
    from upernet_ref.data.datasets import build_dataset
    from upernet_ref.data.transforms import test_transform
    from upernet_ref.evaluation.evaluate import evaluate
    from upernet_ref.model.upernet import build_model
    from upernet_ref.cli.train import run_training

    root = make_bmp_tif_folder(tmp_path / "data")
    cfg = get_config("upernet_small_test", ["data.dataset=folder", "data.num_classes=3"])
    result = run_training(cfg, data_root=str(root), out_dir=tmp_path / "run", max_iters=2,
                   progress=False, validate=False, tensorboard=False, log=lambda _: None)
    assert result.iteration == 2 and all(np.isfinite(result.losses))
    val = build_dataset(cfg, "val", root, test_transform(cfg.data))
    assert [p.suffix for p, _ in val.samples] == [".tif", ".bmp", ".tif", ".bmp"]
    model = build_model(cfg)
    model.load_state_dict(torch.load(result.last_checkpoint, weights_only=False)["model"])
    metrics = evaluate(model, val, cfg, progress=False)
    assert metrics["num_images"] == 4 and 0 <= metrics["miou"] <= 1
