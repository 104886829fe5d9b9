"""A Hugging Face dataset from the command line: `--data.dataset=hf --data-root DIR`, with DIR a
`datasets.save_to_disk` folder made here from the real VOC samples in ../shared/realdata
(skipped when that folder is absent), trained and evaluated through the CLI."""
from __future__ import annotations

import json

import pytest

from upernet_ref.cli import main as upernet
from upernet_ref.configs import get_config
from upernet_ref.data.datasets import build_dataset
from upernet_ref.hf_datasets import HFSegmentation
from upernet_ref.sources import dataset_for

from shared_paths import REALDATA

VOC = REALDATA / "voc" / "VOCdevkit" / "VOC2012"

# custom column and split names, so that every option is exercised
HF = ["--config", "upernet_small_test", "--data.dataset=hf", "--data.num_classes=21",
      "--data.hf_image_column=pixel_values", "--data.hf_annotation_column=label",
      "--data.val_split=validation"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    if not VOC.is_dir():
        pytest.skip(f"{VOC} not available")
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"pixel_values": datasets.Image(), "label": datasets.Image()})

    def split(list_name: str, n: int):
        ids = (VOC / "ImageSets" / "Segmentation" / list_name).read_text().split()[:n]
        return datasets.Dataset.from_dict(
            {"pixel_values": [str(VOC / "JPEGImages" / f"{i}.jpg") for i in ids],
             "label": [str(VOC / "SegmentationClass" / f"{i}.png") for i in ids]},
            features=features)

    folder = tmp_path_factory.mktemp("hf") / "voc_hf"
    datasets.DatasetDict(train=split("train.txt", 8), validation=split("val.txt", 4)
                         ).save_to_disk(str(folder))
    return folder


def test_the_folder_reads_as_the_voc_files_do(hf_folder):
    cfg = get_config("upernet_small_test", [a[2:] for a in HF if a.startswith("--data.")])
    hf = dataset_for(cfg, "validation", hf_folder)
    assert isinstance(hf, HFSegmentation) and len(hf) == 4
    voc = build_dataset(get_config("upernet_small_test", ["data.dataset=voc",
                                                          "data.num_classes=21"]), "val", VOC)
    for i in range(len(hf)):  # same pixels, same labels (palette PNG indices, 255 kept)
        (a, m), (b, n) = hf[i], voc[i]
        assert (a == b).all() and (m == n).all()
    assert set(hf[0][1].unique().tolist()) <= set(range(21)) | {255}


def test_train_and_eval_a_hf_folder_through_the_cli(hf_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert upernet(["train", *HF, "--data-root", str(hf_folder), "--out", str(out),
                    "--max-iters", "2", "--no-progress"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "val mIoU" in printed  # the validation split of the folder was used
    results = tmp_path / "eval.json"
    assert upernet(["eval", "--checkpoint", str(out / "last.pt"), "--data-root", str(hf_folder),
                    "--json", str(results), "--no-progress"]) == 0
    evaluated = json.loads(results.read_text())
    assert evaluated["num_images"] == 4 and evaluated["dataset"] == "hf"
    assert 0 <= evaluated["miou"] <= 1 and len(evaluated["iou"]) == 21


def test_hf_mistakes_are_one_line(hf_folder, tmp_path, capsys):
    cases = [
        (["--data.hf_image_column=img"], "no column 'img'"),
        (["--data.train_split=nope"], "no split 'nope'"),
        ([], "not a datasets.save_to_disk folder"),  # an empty folder
    ]
    for extra, message in cases:
        root = tmp_path if not extra else hf_folder
        code = upernet(["train", *HF, *extra, "--data-root", str(root), "--out",
                        str(tmp_path / "o"), "--max-iters", "1", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("upernet train: error:") and message in err, err
        assert "\n" not in err
