"""Datasets on disk: layouts, label conventions, decoding, bad data, and the real samples."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_data import (make_fake_ade20k, make_fake_cityscapes, make_fake_folder, make_fake_voc,
                          save_index_png)
from upernet_ref.configs import get_config, override
from upernet_ref.data.info import DATASETS, class_names, class_palette, voc_colormap
from upernet_ref.data.datasets import (ADE20K, Cityscapes, DataError, FolderDataset,
                                  VOCSegmentation, build_dataset, decode_label, describe_values,
                                  label_lut, read_label)
from upernet_ref.hf_datasets import HFSegmentation

from shared_paths import REALDATA as REAL


def _raw(path: Path) -> np.ndarray:
    """Label indices as PIL reads them (the reference for the fast decode path)."""
    return np.array(Image.open(path))


VOC, ADE, CITY = DATASETS["voc"], DATASETS["ade20k"], DATASETS["cityscapes"]
VOC_CLASSES, VOC_PALETTE, ADE20K_CLASSES, ADE20K_PALETTE = VOC.classes, VOC.palette, ADE.classes, ADE.palette
CITYSCAPES_CLASSES, CITYSCAPES_PALETTE = CITY.classes, CITY.palette
CITYSCAPES_ID_TO_TRAIN_ID = CITY.id_to_train_id


def test_class_tables():
    # mmsegmentation's ADE20K palette, first, 13th (person) and last colours: the hex decodes right
    assert (ADE20K_PALETTE[0], ADE20K_PALETTE[12], ADE20K_PALETTE[149]) == (
        (120, 120, 120), (150, 5, 61), (92, 0, 255)) and len(set(ADE20K_PALETTE)) == 149  # (140, 140, 140) twice, as in mmseg
    assert len(VOC_CLASSES) == len(VOC_PALETTE) == 21 and VOC_PALETTE[15] == (192, 128, 128)  # person
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert CITYSCAPES_PALETTE[0] == (128, 64, 128) and CITYSCAPES_CLASSES[18] == "bicycle"
    assert sorted(CITYSCAPES_ID_TO_TRAIN_ID.values()) == list(range(19))
    assert voc_colormap()[255] == (224, 224, 192)  # the VOC "void" colour


def test_every_description_is_complete_and_consistent():
    for name, info in DATASETS.items():
        assert info.name == name and len(info.classes) == len(info.palette) == len(set(info.classes))
        assert info.splits and info.layout and info.licence and info.prepare
        lut = info.lut()
        assert sorted(set(lut[lut >= 0].tolist()) - {255}) == list(range(len(info.classes)))
    assert ADE.hub_id == "zhoubolei/scene_parse_150" and ADE.reduce_zero_label
    assert class_names("voc", 21) == VOC_CLASSES and class_names("voc", 5)[4] == "class_4"
    assert class_names("hf", 2, ("cat", "dog")) == ("cat", "dog")
    assert class_palette("cityscapes", 19) == CITYSCAPES_PALETTE
    assert class_palette("folder", 3) == tuple(voc_colormap()[:3])


def test_label_lut_conventions():
    assert label_lut(21)[[0, 20, 21, 255]].tolist() == [0, 20, -1, 255]
    ade = label_lut(150, reduce_zero_label=True)
    assert ade[[0, 1, 150, 151, 255]].tolist() == [255, 0, 149, -1, 255]
    lut = label_lut(19, id_map=CITYSCAPES_ID_TO_TRAIN_ID, num_ids=34)
    assert lut[[0, 6, 7, 26, 33, 34, 255]].tolist() == [255, 255, 0, 13, 18, -1, 255]
    assert describe_values([0, 1, 2, 5, 6, 255]) == "0..2, 5, 6, 255"


def test_decode_label_palette_gives_indices(tmp_path):
    values = np.array([[0, 1, 20], [255, 7, 0]], dtype=np.uint8)
    save_index_png(values, tmp_path / "p.png", palette=True)
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), values)
    # A 4-bit palette PNG: torchvision would return packed bytes, so it goes through PIL.
    small = Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint8))
    small.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 9, 9, 9])
    buffer = io.BytesIO()
    small.save(buffer, "PNG", bits=4)
    np.testing.assert_array_equal(decode_label(buffer.getvalue()), [[0, 1], [2, 3]])
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png.*single-channel"):
        read_label(tmp_path / "rgb.png")


def test_voc_layout_and_values(tmp_path):
    voc = make_fake_voc(tmp_path, n=6)
    assert [len(VOCSegmentation(voc, s)) for s in ("train", "val", "trainval")] == [3, 3, 6]
    ds = VOCSegmentation(voc, "val")
    image, mask = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
    assert mask.dtype == torch.int64 and mask.shape == (24, 32)
    np.testing.assert_array_equal(mask.numpy(), _raw(ds.samples[1][1]))  # indices, not colours
    assert set(mask.unique().tolist()) <= set(range(21)) | {255}
    assert ds.num_classes == 21 and ds.ignore_index == 255 and "2008_000004" in ds.describe(1)
    with pytest.raises(FileNotFoundError, match="trainaug.*prepare voc-aug"):
        VOCSegmentation(voc, "trainaug")


def test_ade20k_reduce_zero_label(tmp_path):
    ade = make_fake_ade20k(tmp_path, n=4)
    ds = ADE20K(ade, "training")
    assert len(ds) == 4 and len(ADE20K(ade, "validation")) == 2 and ds.num_classes == 150
    raw = _raw(ds.samples[0][1]).astype(np.int64)
    mask = ds[0][1].numpy()
    np.testing.assert_array_equal(mask[raw == 0], 255)
    np.testing.assert_array_equal(mask[raw > 0], raw[raw > 0] - 1)
    plain = ADE20K(ade, "training", reduce_zero_label=False)
    assert plain.num_classes == 151
    np.testing.assert_array_equal(plain[0][1].numpy(), raw)


def test_cityscapes_train_id_mapping(tmp_path):
    city = make_fake_cityscapes(tmp_path, n=4)
    ds = Cityscapes(city, "train")
    assert len(ds) == 4 and len(Cityscapes(city, "val")) == 2
    raw = _raw(ds.samples[0][1])
    expected = np.full(raw.shape, 255)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        expected[raw == label_id] = train_id
    np.testing.assert_array_equal(ds[0][1].numpy(), expected)
    assert "aachen_000000_000019_gtFine_labelIds.png" in ds.describe(0)


def test_folder_dataset_and_build_dataset(tmp_path):
    folder = make_fake_folder(tmp_path, classes=("bg", "cat", "dog"), n=3)
    ds = FolderDataset(folder / "images" / "train", folder / "masks" / "train", ("bg", "cat", "dog"))
    assert len(ds) == 3 and set(ds[0][1].unique().tolist()) <= {0, 1, 2, 255}
    cfg = override(get_config("upernet_small_test"), ["data.dataset=folder", "data.num_classes=3"])
    built = build_dataset(cfg, "val", root=folder)
    assert built.classes == ("bg", "cat", "dog") and len(built) == 3
    make_fake_voc(tmp_path, n=4)
    cfg = override(get_config("upernet_small_test"), ["data.dataset=voc", "data.num_classes=21"])
    assert len(build_dataset(cfg, "train", root=tmp_path)) == 2  # parent of VOCdevkit works too
    with pytest.raises(ValueError, match="needs its folder: --data-root"):
        build_dataset(cfg, "train")
    from upernet_ref.sources import dataset_for  # the shell's builder, which adds the demo
    demo = dataset_for(get_config("upernet_small_test"), "val", transform=lambda i, m: (i, m))
    image, mask = demo[0]
    assert image.dtype == torch.uint8 and mask.dtype == torch.int64


def test_hugging_face_adapter():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    anns = [rng.integers(0, 151, (8, 10), dtype=np.uint8) for _ in range(2)]
    rows = {"image": [Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)) for _ in anns],
            "annotation": [Image.fromarray(a) for a in anns]}
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    hf = datasets.Dataset.from_dict(rows, features=features)
    ds = HFSegmentation(hf, classes=ADE20K_CLASSES, reduce_zero_label=True)
    image, mask = ds[1]
    assert len(ds) == 2 and image.shape == (3, 8, 10) and image.dtype == torch.uint8
    expected = np.where(anns[1] == 0, 255, anns[1].astype(np.int64) - 1)
    np.testing.assert_array_equal(mask.numpy(), expected)
    with pytest.raises(ValueError, match="no column 'label'"):
        HFSegmentation(hf, annotation_column="label")


def _plant(voc: Path, kind: str) -> str:
    """Break pair 2008_000001 of a fake VOC in one way; returns what the error must name."""
    image, label = voc / "JPEGImages" / "2008_000001.jpg", voc / "SegmentationClass" / "2008_000001.png"
    if kind == "missing label":
        label.unlink()
        return "2008_000001.png"
    if kind == "truncated image":
        image.write_bytes(image.read_bytes()[:300])
        return "2008_000001.jpg"
    if kind == "size mismatch":
        save_index_png(np.zeros((10, 10)), label, palette=True)
        return "differs"
    save_index_png(np.full((24, 32), 21), label, palette=True)  # 21 is not a VOC class
    return "values 21 are outside the valid set 0..20, 255"


@pytest.mark.parametrize("kind", ["missing label", "truncated image", "size mismatch", "bad value"])
def test_bad_sample_raises_naming_the_file(tmp_path, kind):
    voc = make_fake_voc(tmp_path, n=4)
    expected = _plant(voc, kind)
    ds = VOCSegmentation(voc, "train")
    ds[0]  # a good sample loads
    with pytest.raises(DataError, match=expected):
        ds[1]


def test_bad_sample_skip_and_count(tmp_path):
    voc = make_fake_voc(tmp_path, n=4)
    _plant(voc, "bad value")
    ds = VOCSegmentation(voc, "trainval", on_bad="skip")
    with pytest.warns(UserWarning, match="skipping bad sample 1"):
        _, mask = ds[1]
    np.testing.assert_array_equal(mask.numpy(), _raw(ds.samples[2][1]))  # the next good one
    assert list(ds.bad) == [1] and len(list(ds)) == 4  # iteration still stops at the end
    assert len(ds.bad) == 1
    for i in range(4):  # every label the wrong size
        save_index_png(np.zeros((10, 10)), voc / "SegmentationClass" / f"2008_{i:06d}.png")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="all 4 samples are bad"):
        VOCSegmentation(voc, "trainval", on_bad="skip")[0]


# ------------------------------------------------------------------------------------------
# The real samples in /work/shared/realdata (skipped when absent)


def _real(sub: str) -> Path:
    path = REAL / sub
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_real_voc():
    voc = _real("voc/VOCdevkit/VOC2012")
    assert [len(VOCSegmentation(voc, s)) for s in ("train", "val", "trainval")] == [147, 104, 251]
    ds = VOCSegmentation(voc, "trainval")
    stored = Image.open(ds.samples[0][1]).getpalette()
    assert [tuple(stored[3 * i: 3 * i + 3]) for i in range(256)] == voc_colormap()
    seen: set[int] = set()
    for i in range(0, len(ds), 5):  # the fast path returns PIL's indices, file by file
        image, mask = ds[i]
        np.testing.assert_array_equal(mask.numpy(), _raw(ds.samples[i][1]))
        assert image.shape[1:] == mask.shape
        seen |= set(np.unique(mask.numpy()).tolist())
    assert {0, 15, 255} <= seen <= set(range(21)) | {255}


def test_real_ade20k():
    ade = _real("ade20k/ADEChallengeData2016")
    for split, count in (("training", 1), ("validation", 3)):
        ds = ADE20K(ade, split)
        assert len(ds) == count
        for i in range(count):
            raw = _raw(ds.samples[i][1]).astype(np.int64)
            mask = ds[i][1].numpy()
            assert ds[i][0].shape[1:] == mask.shape and raw.max() <= 150
            np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw - 1))


def test_real_cityscapes_lut_matches_label_train_ids():
    city = _real("cityscapes")
    ds, compared = Cityscapes(city, "train"), 0
    assert len(ds) == 20
    for i, (_, label_ids) in enumerate(ds.samples):
        train_ids = label_ids.with_name(label_ids.name.replace("labelIds", "labelTrainIds"))
        if not train_ids.exists():
            continue
        mask, reference = ds[i][1].numpy(), _raw(train_ids)
        disagree = (mask != reference).mean()
        assert disagree < 0.01, f"{train_ids}: {disagree:.4f} of pixels differ"  # polygon re-rendering
        assert set(np.unique(mask)) == set(np.unique(reference))
        compared += 1
    assert compared == 10
    small = _real("cityscapes_small_val")
    val = Cityscapes(small, "val")
    assert len(val) == 1 and set(np.unique(val[0][1].numpy())) <= set(range(19)) | {255}


def test_upernet_data_list_prints_every_description(capsys):
    from upernet_ref.cli import main as upernet
    assert upernet(["data", "list"]) == 0
    out = capsys.readouterr().out
    for info in DATASETS.values():
        assert f"{info.name}: {info.title}, {len(info.classes)} classes" in out
        assert info.licence in out and info.prepare in out
    assert "Hugging Face Hub: zhoubolei/scene_parse_150" in out
