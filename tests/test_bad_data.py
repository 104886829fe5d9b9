"""Bad data through the real command line (issue 19, items 6 and 7): label values above
`data.num_classes - 1` are a data error naming the file (or Hugging Face row) and the value, in
`upernet data check`, training and evaluation; Hugging Face datasets honour `data.on_bad` in
training, name the folder, split, row and column, and have their column types checked first."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers_cli import one_line, run
from helpers_data import make_fake_voc

datasets = pytest.importorskip("datasets")  # a third-party dependency, not the project's module
datasets.disable_progress_bars()  # save_to_disk's bars would be taken for the command's stderr

TRAIN = ["train", "--config", "upernet_small_test", "--no-progress", "--no-val", "--max-iters", "1"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_fake_voc(tmp_path_factory.mktemp("voc"), n=4)


def test_voc_labels_above_num_classes_are_a_data_error_naming_the_file(voc, tmp_path, capfd):
    code, _, err = run(capfd, TRAIN + ["--data.dataset=voc", "--data.num_classes=5",
                                       "--data.train_split=train", "--data-root", str(voc),
                                       "--out", str(tmp_path / "run")])
    assert code == 1
    one_line(err, "train", str(voc / "SegmentationClass"), ".png: label values",
             "are outside the valid set 0..4, 255")


def test_data_check_reports_labels_above_num_classes(voc, capfd):
    code, out, err = run(capfd, ["data", "check", "--dataset", "voc", "--root", str(voc),
                                 "--split", "val", "--num-classes", "5", "--workers", "1",
                                 "--no-progress"])
    assert code == 1, err
    bad = [line for line in out.splitlines() if "outside the valid set 0..4, 255" in line]
    assert len(bad) == 2 and all(str(voc / "SegmentationClass") in line for line in bad)


def hf_folder(path, rows, features=None):
    """A DatasetDict(train=rows, validation=rows) saved to `path`."""
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=split, validation=split).save_to_disk(str(path))
    return path


def image_rows(bad_row: int | None = None):
    """4 rows of 32x32 images and 3-class annotations; `bad_row` has a label 9."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(4):
        images.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        label = rng.integers(0, 3, (32, 32), dtype=np.uint8)
        if i == bad_row:
            label[0, 0] = 9
        annotations.append(Image.fromarray(label))
    features = datasets.Features(image=datasets.Image(), annotation=datasets.Image())
    return {"image": images, "annotation": annotations}, features


HF = ["--data.dataset=hf", "--data.num_classes=3", "--data.train_split=train",
      "--data.val_split=validation"]


def test_hf_training_names_the_bad_row_and_honours_on_bad_skip(tmp_path, capfd):
    folder = hf_folder(tmp_path / "hf", *image_rows(bad_row=1))
    base = TRAIN[:-1] + ["2", "--data-root", str(folder)] + HF
    code, _, err = run(capfd, base + ["--out", str(tmp_path / "raise")])
    assert code == 1
    one_line(err, "train", f"{folder} split 'train' row 1: label values 9 are outside the "
                           f"valid set 0..2, 255")
    code, out, err = run(capfd, base + ["--out", str(tmp_path / "skip"), "--data.on_bad=skip"])
    assert code == 0, err
    assert "skipped 1 bad training sample(s) (data.on_bad=skip)" in out
    assert f"first: {folder} split 'train' row 1: label values 9" in out


@pytest.mark.parametrize("rows, column, found", [
    ({"image": ["a.jpg", "b.jpg"], "annotation": ["a.png", "b.png"]}, "image", "Value('string')"),
    (None, "annotation", "Value('int64')"),
])
def test_hf_column_types_are_checked_before_any_work(tmp_path, capfd, rows, column, found):
    if rows is None:  # images, but integers as annotations
        good, _ = image_rows()
        rows = {"image": good["image"], "annotation": [1, 2, 3, 4]}
        features = datasets.Features(image=datasets.Image(), annotation=datasets.Value("int64"))
    else:
        features = None
    folder = hf_folder(tmp_path / "hf", rows, features)
    code, _, err = run(capfd, TRAIN + ["--data-root", str(folder), "--out", str(tmp_path / "r")]
                       + HF)
    assert code == 2
    one_line(err, "train", f"{folder} split 'train': column {column!r} holds {found}",
             f"--data.hf_{column}_column")


def test_an_empty_dataset_dict_is_called_so(tmp_path, capfd):
    datasets.DatasetDict().save_to_disk(str(tmp_path / "empty"))
    code, _, err = run(capfd, TRAIN + ["--data-root", str(tmp_path / "empty"),
                                       "--out", str(tmp_path / "r")] + HF)
    assert code == 2
    one_line(err, "train", f"{tmp_path / 'empty'}: an empty DatasetDict (no splits)")
