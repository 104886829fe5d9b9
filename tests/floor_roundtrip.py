"""Run by tests/test_dependency_floors.py with the minimum huggingface_hub, safetensors and
datasets first on PYTHONPATH: the package imports, a model folder round-trips (save, card,
load, identical logits) and a `save_to_disk` dataset reads."""
import importlib.metadata as md
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

import upernet_ref
from upernet_ref import build_model, hub
from upernet_ref.hf_datasets import open_hf_dataset

for name in ("huggingface_hub", "safetensors", "datasets"):
    print(name, md.version(name), __import__(name).__file__)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    model = build_model("upernet_small_test").eval()
    hub.save_pretrained(model, tmp / "m", metrics={"miou": 0.5, "split": "val"})
    again = upernet_ref.from_pretrained(tmp / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], again(x)["out"])
    assert "value: 0.5" in (tmp / "m" / "README.md").read_text()
    rows = {"image": [Image.fromarray(np.zeros((8, 8, 3), np.uint8))] * 2,
            "annotation": [Image.fromarray(np.ones((8, 8), np.uint8))] * 2}
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows, features=features)).save_to_disk(str(tmp / "d"))
    ds = open_hf_dataset(str(tmp / "d"), "train", num_classes=3)
    image, mask = ds[0]
    assert tuple(image.shape) == (3, 8, 8) and int(mask[0, 0]) == 0
print("round trip ok")
