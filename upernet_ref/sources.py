"""Where a command's data comes from: the one place that opens a dataset by its name.

The reading core opens folders of files (`data/datasets.py`: VOC, ADE20K, Cityscapes, a folder of
your own). Around it, the shell adds the Hugging Face `datasets` adapter (`hf_datasets`) and the
embedded demo scenes (`demo_scenes`, generated, not read), so that `upernet train` and
`upernet eval` take any of them by `--data.dataset`:

    dataset = dataset_for(cfg, split, root, transform)   # cfg.data.dataset: what to open
"""
from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path

import torch

from upernet_ref import configs
from upernet_ref.data.datasets import build_dataset
from upernet_ref.data.info import class_names
from upernet_ref.demo_scenes import DEMO_CLASSES, DemoScenes
from upernet_ref.errors import UsageError
from upernet_ref.hf_datasets import open_hf_dataset


def dataset_for(cfg: configs.Config, split: str, root: str | Path | None = None,
                transform: Callable | None = None, on_bad: str = "raise") -> torch.utils.data.Dataset:
    """The dataset of `cfg.data.dataset`: the demo scenes for "demo", a Hugging Face dataset for
    "hf" (`root`: a `save_to_disk` folder or a Hub id; the `data.hf_*` options), else the one on
    disk (`data.datasets.build_dataset`)."""
    data = cfg.data
    if data.dataset == "demo":
        if data.num_classes != len(DEMO_CLASSES):  # its labels are 0..7: a loss would fail
            raise UsageError(f"the demo scenes have {len(DEMO_CLASSES)} classes, but "
                             f"{cfg.name} has data.num_classes={data.num_classes}; use "
                             f"--data.num_classes={len(DEMO_CLASSES)}, "
                             f"or train on a dataset with {data.num_classes} classes")
        return DemoScenes(split, transform=transform)
    if data.dataset != "hf":
        return build_dataset(cfg, split, root, transform, on_bad=on_bad)
    if root is None:
        raise ValueError("dataset 'hf' needs its folder or Hub id: --data-root DIR_OR_ID "
                         "(data/README.md)")
    return open_hf_dataset(str(root), split, num_classes=data.num_classes,
                           reduce_zero_label=data.reduce_zero_label,
                           image_column=data.hf_image_column,
                           annotation_column=data.hf_annotation_column, config=data.hf_config,
                           revision=data.hf_revision, transform=transform, on_bad=on_bad)


def with_class_names(cfg: configs.Config, dataset: typing.Any) -> configs.Config:
    """`cfg` with `data.classes` set from the dataset's names (classes.txt, a ClassLabel
    feature) when the configuration names none and they are not the description's own: the
    names then travel with the checkpoint, config.json and model card (id2label)."""
    names = tuple(getattr(dataset, "classes", ()) or ())
    n = cfg.data.num_classes
    if cfg.data.classes or len(names) != n or names == class_names(cfg.data.dataset, n):
        return cfg
    return configs.override(cfg, {"data.classes": names})
