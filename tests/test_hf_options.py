"""Hugging Face datasets beyond the basic folder (no network, no real data needed): the
"validation" split found for "val", class names from a ClassLabel feature, --data.hf_config and
--data.hf_revision passed to `datasets`, streaming datasets refused in one line, the offline
message."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from upernet_ref.cli import main as upernet
from upernet_ref.hf_datasets import HFSegmentation, open_hf_dataset
from upernet_ref.errors import UsageError

datasets = pytest.importorskip("datasets")  # the [hf] extra (a third-party package)
import datasets.config  # noqa: E402
import huggingface_hub.constants  # noqa: E402  (a dependency of datasets)
NAMES = ["background", "cat", "dog"]


def tiny(n: int, seed: int):
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "kinds": datasets.ClassLabel(names=NAMES)})
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
                      for _ in range(n)],
            "annotation": [Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8))
                           for _ in range(n)],
            "kinds": [i % 3 for i in range(n)]}
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    datasets.DatasetDict(train=tiny(6, 0), validation=tiny(3, 1)).save_to_disk(str(path))
    return path


HF = ["--config", "upernet_small_test", "--data.dataset=hf", "--data.num_classes=3",
      "--data.reduce_zero_label=false"]


def test_val_finds_validation_and_classlabel_names_the_classes(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert upernet(["train", *HF, "--data-root", str(folder), "--out", str(out),
                    "--max-iters", "5", "--no-progress"]) == 0  # val_split is "val"
    err = capsys.readouterr().err
    assert "has no split 'val': using 'validation'" in err and "without validation" not in err
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "val" for r in rows)  # it validated on "validation"
    assert all(isinstance(r["time"], float) and r["time"] > 1.7e9 for r in rows)  # wall clock
    ds = open_hf_dataset(str(folder), "train", num_classes=3, reduce_zero_label=False)
    assert list(ds.classes) == NAMES


def test_hub_config_and_revision_reach_datasets(folder, monkeypatch, tmp_path):
    asked = {"load": []}

    def split_names(path, config=None, revision=None):
        asked["names"] = (path, config, revision)
        return ["train", "validation"]

    def load_dataset(path, config=None, revision=None, split=None):
        asked["load"].append((path, config, revision, split))
        return tiny(4, 2)

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert upernet(["train", *HF, "--data-root", "someone/segments", "--data.hf_config=small",
                    "--data.hf_revision=v1.0", "--out", str(tmp_path / "run"), "--max-iters",
                    "1", "--no-val", "--no-progress"]) == 0
    assert asked["names"] == ("someone/segments", "small", "v1.0")
    assert ("someone/segments", "small", "v1.0", "train") in asked["load"]


def test_streaming_is_refused_in_one_line(folder):
    stream = datasets.load_from_disk(str(folder))["train"].to_iterable_dataset()
    with pytest.raises(UsageError, match="streaming .* not supported: training's sampler"):
        HFSegmentation(stream, NAMES)


def test_an_unreachable_hub_dataset_says_how_to_work_offline(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variable once, at import (done above): without these two the
    # load goes to the network and takes 20+ s to fail where there is none
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert upernet(["train", *HF, "--data-root", "someone/not-cached", "--out",
                    str(tmp_path / "run"), "--max-iters", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upernet train: error: someone/not-cached") and "\n" not in err
    assert "HF_HUB_OFFLINE" in err


def test_the_classlabel_names_travel_with_the_model(folder, tmp_path, capsys):
    """Trained on the HF folder, the run's config.json, checkpoint and exported card name the
    classes of its ClassLabel feature, and predict prints them (not class_0)."""
    run = tmp_path / "run"
    assert upernet(["train", *HF, "--data-root", str(folder), "--out", str(run),
                    "--max-iters", "1", "--no-val", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["classes"] == NAMES
    hf = tmp_path / "hf"
    assert upernet(["export", "--checkpoint", str(run / "last.pt"), "--format", "safetensors",
                    "--out", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["id2label"] == {"0": "background", "1": "cat", "2": "dog"}
    assert "| classes | 3: background, cat, dog |" in (hf / "README.md").read_text()
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(image)
    capsys.readouterr()
    assert upernet(["predict", "--checkpoint", str(hf), "--out", str(tmp_path / "p"),
                    str(image)]) == 0
    shares = capsys.readouterr().out.split("classes:")[1]
    assert any(name in shares for name in NAMES) and "class_" not in shares
