"""`upernet data prepare|check`: SBD conversion, Cityscapes train ids, and every planted defect."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers_data import (make_fake_ade20k, make_fake_cityscapes, make_fake_folder, make_fake_sbd,
                          make_fake_voc, save_index_png)
from upernet_ref.cli.data import main
from upernet_ref.data.datasets import Cityscapes, VOCSegmentation

from shared_paths import REALDATA as REAL
QUIET = ["--workers", "1", "--no-progress"]


def test_prepare_voc_aug(tmp_path, capsys):
    voc = make_fake_voc(tmp_path, n=6)  # train 2008_000000..02, val 2008_000003..05
    sbd_train, sbd_val = ["2008_000000", "2009_000001", "2008_000004"], ["2009_000002"]
    sbd = make_fake_sbd(tmp_path, voc, sbd_train, sbd_val)
    assert main(["prepare", "voc-aug", "--voc-root", str(voc), "--sbd-root", str(sbd)] + QUIET) == 0
    ids = (voc / "ImageSets" / "Segmentation" / "trainaug.txt").read_text().split()
    # (SBD train + SBD val + VOC train) - VOC val
    assert ids == ["2008_000000", "2008_000001", "2008_000002", "2009_000001", "2009_000002"]
    assert "5 ids" in capsys.readouterr().out
    aug = voc / "SegmentationClassAug"
    seg = scipy.io.loadmat(sbd / "cls" / "2009_000001.mat")["GTcls"][0]["Segmentation"][0]
    np.testing.assert_array_equal(np.array(Image.open(aug / "2009_000001.png")), seg)
    assert Image.open(aug / "2009_000001.png").mode == "P"
    # Where VOC and SBD both annotate an image, VOC's label (with its 255 boundaries) wins.
    voc_label = np.array(Image.open(voc / "SegmentationClass" / "2008_000000.png"))
    np.testing.assert_array_equal(np.array(Image.open(aug / "2008_000000.png")), voc_label)
    ds = VOCSegmentation(voc, "trainaug")
    assert len(ds) == 5 and ds[3][1].max() <= 20


def test_prepare_voc_aug_rejects_bad_mat(tmp_path, capsys):
    voc = make_fake_voc(tmp_path, n=2)
    sbd = make_fake_sbd(tmp_path, voc, ["2009_000001"], [])
    scipy.io.savemat(sbd / "cls" / "2009_000001.mat", {"GTcls": {"Segmentation": np.full((4, 4), 30)}})
    assert main(["prepare", "voc-aug", "--voc-root", str(voc), "--sbd-root", str(sbd)] + QUIET) == 1
    assert "2009_000001.mat: expected a 2-D map of values 0..20" in capsys.readouterr().err


def test_prepare_cityscapes_matches_on_the_fly_mapping(tmp_path):
    city = make_fake_cityscapes(tmp_path, n=3)
    assert main(["prepare", "cityscapes", "--root", str(city)] + QUIET) == 0
    assert len(list((city / "gtFine").glob("*/*/*_gtFine_labelTrainIds.png"))) == 5
    on_the_fly = Cityscapes(city, "train")
    from_files = Cityscapes(city, "train", use_train_ids_file=True)
    for i in range(3):
        assert from_files.samples[i][1].name.endswith("_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(on_the_fly[i][1].numpy(), from_files[i][1].numpy())


def test_prepare_cityscapes_keeps_existing_files_unless_overwrite(tmp_path, capsys):
    city = make_fake_cityscapes(tmp_path, n=3)  # 5 labelIds files: 3 train, 2 val
    argv = ["prepare", "cityscapes", "--root", str(city)] + QUIET
    labels = city / "gtFine" / "train" / "aachen"
    official = labels / "aachen_000000_000019_gtFine_labelTrainIds.png"  # e.g. cityscapesscripts'
    official.write_bytes(b"sentinel: written before us")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote 4 " in out and "skipped 1 that already exist" in out and "--overwrite" in out
    assert official.read_bytes() == b"sentinel: written before us"
    ours = labels / "aachen_000002_000019_gtFine_labelTrainIds.png"
    ours.write_bytes(b"sentinel: ours, edited")
    assert main(argv) == 0  # the second run writes nothing
    out = capsys.readouterr().out
    assert "wrote 0 " in out and "skipped 5 that already exist" in out
    assert official.read_bytes() == b"sentinel: written before us"
    assert ours.read_bytes() == b"sentinel: ours, edited"
    assert main(argv + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "wrote 5 " in out and "skipped" not in out
    on_the_fly = Cityscapes(city, "train")
    from_files = Cityscapes(city, "train", use_train_ids_file=True)
    for i in range(3):  # both sentinels regenerated
        np.testing.assert_array_equal(on_the_fly[i][1].numpy(), from_files[i][1].numpy())
    assert not list(city.rglob("*.part"))  # no temporary files left behind


def test_prepare_voc_aug_keeps_existing_files_unless_overwrite(tmp_path, capsys):
    voc = make_fake_voc(tmp_path, n=4)  # train 2008_000000..01, val 2008_000002..03
    sbd = make_fake_sbd(tmp_path, voc, ["2008_000000", "2009_000001"], ["2009_000002"])
    argv = ["prepare", "voc-aug", "--voc-root", str(voc), "--sbd-root", str(sbd)] + QUIET
    aug = voc / "SegmentationClassAug"
    trainaug = voc / "ImageSets" / "Segmentation" / "trainaug.txt"
    aug.mkdir()
    (aug / "2009_000001.png").write_bytes(b"sentinel")
    trainaug.write_text("2008_000000\n")  # a list of the user's own
    assert main(argv) == 0
    out = capsys.readouterr().out
    # 4 VOC labels + 2 SBD-only labels; VOC's 2008_000000 is not converted from SBD at all
    assert "wrote 5 label PNGs" in out and "skipped 1 that already exist" in out
    assert "kept the existing" in out and "1 ids" in out and "computed list has 4 ids" in out
    assert (aug / "2009_000001.png").read_bytes() == b"sentinel"
    assert trainaug.read_text() == "2008_000000\n"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote 0 label PNGs" in out and "skipped 6 that already exist" in out
    assert main(argv + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 label PNGs" in out and "4 ids" in out and "skipped" not in out
    seg = scipy.io.loadmat(sbd / "cls" / "2009_000001.mat")["GTcls"][0]["Segmentation"][0]
    np.testing.assert_array_equal(np.array(Image.open(aug / "2009_000001.png")), seg)
    assert trainaug.read_text().split() == ["2008_000000", "2008_000001",
                                            "2009_000001", "2009_000002"]
    voc_label = np.array(Image.open(voc / "SegmentationClass" / "2008_000000.png"))
    np.testing.assert_array_equal(np.array(Image.open(aug / "2008_000000.png")), voc_label)


def test_prepare_reports_an_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    city = make_fake_cityscapes(tmp_path, n=1)
    folders = sorted((city / "gtFine").glob("*/*"))
    if os.geteuid() == 0:  # root writes into read-only folders: fail the save as they would
        def refuse(image, fp, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        monkeypatch.setattr(Image.Image, "save", refuse)
    for folder in folders:
        folder.chmod(0o555)
    try:
        assert main(["prepare", "cityscapes", "--root", str(city)] + QUIET) == 1
    finally:
        for folder in folders:
            folder.chmod(0o755)
    err = capsys.readouterr().err
    assert "upernet data prepare: " in err and "cannot write" in err and "Permission denied" in err
    assert "is not writable" in err and str(folders[0]) in err


@pytest.mark.parametrize("dataset", ["voc", "ade20k", "cityscapes", "folder"])
def test_check_clean_dataset_passes(tmp_path, capsys, dataset):
    root = {"voc": lambda: make_fake_voc(tmp_path, n=4).parent.parent,
            "ade20k": lambda: make_fake_ade20k(tmp_path, n=2),
            "cityscapes": lambda: make_fake_cityscapes(tmp_path, n=2),
            "folder": lambda: make_fake_folder(tmp_path, n=2)}[dataset]()
    assert main(["check", "--dataset", dataset, "--root", str(root)] + QUIET) == 0
    out = capsys.readouterr().out
    assert "OK: no problems found" in out and out.count("no problems;") == 2  # both splits


def _broken_voc(tmp_path: Path) -> Path:
    """A fake VOC with one defect per pair (pair 0 stays clean) and an empty split list."""
    voc = make_fake_voc(tmp_path, n=6)
    image, label = voc / "JPEGImages", voc / "SegmentationClass"
    (label / "2008_000001.png").unlink()                                             # missing label
    data = (image / "2008_000002.jpg").read_bytes()
    (image / "2008_000002.jpg").write_bytes(data[: len(data) // 2])                   # truncated
    save_index_png(np.zeros((10, 12)), label / "2008_000003.png", palette=True)       # size mismatch
    bad = np.array(Image.open(label / "2008_000004.png"))
    bad[:4, :4], bad[-4:, -4:] = 21, 254
    save_index_png(bad, label / "2008_000004.png", palette=True)                      # out of range
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "trainval.txt").write_text("".join(f"2008_{i:06d}\n" for i in range(6)))
    (lists / "empty.txt").write_text("")                                              # empty split
    return voc


@pytest.mark.parametrize("workers", ["1", "2"])
def test_check_finds_every_planted_defect(tmp_path, capsys, workers):
    voc = _broken_voc(tmp_path)
    argv = ["check", "--dataset", "voc", "--root", str(voc), "--split", "trainval", "--split", "empty",
            "--workers", workers, "--no-progress"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "missing label: " in out and "2008_000001.png: label file is missing" in out
    assert "truncated image: " in out and "2008_000002.jpg: image is truncated" in out
    assert "size mismatch: " in out and "2008_000003.png: label size (10, 12) differs" in out
    assert "invalid label values: " in out and "2008_000004.png: label values 21, 254" in out
    assert "[empty] empty split" in out and "empty.txt" in out
    assert "2008_000000" not in out and "2008_000005" not in out  # the clean pairs are not named
    assert ("voc trainval: 6 pairs, 1 invalid label values, 1 missing label, 1 size mismatch, "
            "1 truncated image") in out
    assert "FAILED: 5 problem(s) found" in out


def test_check_empty_ade_split_and_unreadable_image(tmp_path, capsys):
    ade = make_fake_ade20k(tmp_path, n=2)
    for path in (ade / "images" / "validation").iterdir():
        path.unlink()
    (ade / "images" / "training" / "ADE_train_00000001.jpg").write_bytes(b"not a jpeg at all")
    assert main(["check", "--dataset", "ade20k", "--root", str(ade)] + QUIET) == 1
    out = capsys.readouterr().out
    assert "[validation] empty split" in out
    assert "unreadable image: " in out and "ADE_train_00000001.jpg" in out


def test_check_decode_images_finds_corruption_mid_file(tmp_path, capsys):
    folder = make_fake_folder(tmp_path, n=2)
    path = folder / "images" / "train" / "img0.jpg"
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\xda") + 20  # inside the entropy-coded scan
    data[start: start + 200] = b"\xff\xc0\x00\x02" * 50  # a second frame header mid-scan
    path.write_bytes(bytes(data))
    argv = ["check", "--dataset", "folder", "--root", str(folder), "--split", "train"] + QUIET
    assert main(argv) == 0  # header and end marker intact: the quick check cannot see it
    capsys.readouterr()
    assert main(argv + ["--decode-images"]) == 1
    assert "img0.jpg: unreadable" in capsys.readouterr().out


def test_check_real_voc(capsys):
    if not (REAL / "voc").exists():
        pytest.skip("realdata not available")
    argv = ["check", "--dataset", "voc", "--root", str(REAL / "voc"), "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "voc train: 147 pairs, no problems" in out and "voc val: 104 pairs, no problems" in out
