"""`upernet predict` output names (sub-folders kept, clashes refused) and its console line."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_ref import build_model, configs
from upernet_ref.cli.predict import main as predict_main
from upernet_ref.demo_scenes import DEMO_CLASSES

CFG = configs.get_config("upernet_small_test")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    torch.save({"model": build_model(CFG).state_dict(), "config": configs.to_dict(CFG)}, path)
    return path


def write_image(path, size, seed):
    """A random RGB image of size (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def predict(checkpoint, out_dir, *inputs):
    return predict_main(["--checkpoint", str(checkpoint), "--out", str(out_dir), "--device", "cpu",
                         *map(str, inputs)])


def test_folder_inputs_keep_their_sub_folders(checkpoint, tmp_path, capsys):
    pin, out_dir = tmp_path / "pin", tmp_path / "out"
    write_image(pin / "a" / "x.jpg", (20, 28), seed=0)  # same name, different sub-folders
    write_image(pin / "b" / "x.jpg", (24, 16), seed=1)
    write_image(pin / "top.png", (12, 12), seed=2)
    assert predict(checkpoint, out_dir, pin) == 0
    for name, (h, w) in (("a/x", (20, 28)), ("b/x", (24, 16)), ("top", (12, 12))):
        for suffix in (".png", "_color.png", "_overlay.jpg"):
            assert Image.open(out_dir / f"{name}{suffix}").size == (w, h), name + suffix
    assert not (out_dir / "x.png").exists()
    out = capsys.readouterr().out
    assert f"{pin / 'a' / 'x.jpg'} -> {out_dir / 'a' / 'x.png'}" in out
    assert f"{pin / 'b' / 'x.jpg'} -> {out_dir / 'b' / 'x.png'}" in out
    assert "3 of 3 images predicted" in out


def test_console_line_names_the_size_and_the_classes(checkpoint, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    write_image(image, (20, 28), seed=3)
    assert predict(checkpoint, tmp_path / "out", image) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "((" not in line and "(20, 28)" not in line
    match = re.search(r"  20x28 \(HxW\), classes: (.+)$", line)
    assert match, line
    shares = re.findall(r"([a-z ]+) (\d+\.\d)%", match.group(1))  # "sky 61.2%, ground 38.8%"
    assert shares and {name.strip() for name, _ in shares} <= set(DEMO_CLASSES)
    percent = [float(p) for _, p in shares]
    assert percent == sorted(percent, reverse=True) and sum(percent) == pytest.approx(100, abs=0.5)


def test_files_with_the_same_name_are_refused(checkpoint, tmp_path, capsys):
    pin, out_dir = tmp_path / "pin", tmp_path / "out"
    write_image(pin / "a" / "x.jpg", (12, 12), seed=0)
    write_image(pin / "b" / "x.jpg", (12, 12), seed=1)
    assert predict(checkpoint, out_dir, pin / "a" / "x.jpg", pin / "b" / "x.jpg") == 2
    err = capsys.readouterr().err
    assert "x.png" in err and str(pin / "a" / "x.jpg") in err and str(pin / "b" / "x.jpg") in err
    assert "folder" in err  # how to get both: give their folder
    assert not out_dir.exists()  # refused before anything is written
    # a file given directly and a folder's top-level image with the same name clash too
    assert predict(checkpoint, out_dir, pin / "a", pin / "b" / "x.jpg") == 2
    assert not out_dir.exists()
    capsys.readouterr()
    # the same file given twice is predicted once
    assert predict(checkpoint, out_dir, pin / "a" / "x.jpg", pin / "a" / "x.jpg") == 0
    assert "1 of 1 images predicted" in capsys.readouterr().out
