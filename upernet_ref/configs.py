"""Typed, frozen configurations: the 12 published UPerNet recipes and small CPU configs.

Every number here comes from the published sssegmentation UPerNet model card, summarised with
its sources in `docs/SPEC.md` ("The 12 published results", "Training recipe", "Published
figures"); where the paper's own setting differs, `docs/SPEC.md` ("Paper vs published recipe")
says so. A configuration is four frozen dataclasses
(model, data, train, test) bundled in a `Config`. The published recipes are named
`upernet_r{50,101}_os{8,16}_{voc,ade20k,cityscapes}`; the small ones, for laptops, notebooks and
tests, are `upernet_small_demo` and `upernet_small_test`.

Every field's type and range is checked when its section is built (`_RULES`), and the
sections against each other when the `Config` is, so a bad value is refused, naming the field,
before any work; overrides, configuration files and stored configurations (checkpoints,
config.json: the shell's `config_files`) take that one path. Each value is stored once: the
class count is `data.num_classes` (the model's follows it) and the sliding window defaults to
the training crop `data.crop_size`.

    >>> cfg = get_config("upernet_r50_os8_ade20k")
    >>> cfg.train.max_iters
    164190
    >>> override(cfg, ["train.lr=0.02", "model.output_stride=16"]).train.lr
    0.02
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field

from upernet_ref.data.info import DATASETS
from upernet_ref.errors import UsageError


class ConfigKeyError(UsageError, KeyError):
    """An unknown configuration name or override key; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would print the repr, newlines escaped
        return str(self.args[0]) if self.args else ""


class ConfigError(UsageError, ValueError, TypeError):
    """A configuration value of the wrong type or outside its range; the message names the
    field. Raised when the configuration is built, so a command refuses it before any work."""


IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelConfig:
    """The network: dilated ResNet backbone + PPM + FPN fusion head (+ FCN auxiliary head)."""

    depth: int = 50  # 18, 34 (basic blocks) or 50, 101 (bottlenecks)
    stem: str = "deep"  # "deep" (v1c: three 3x3 convs, as published) or "plain" (7x7, torchvision)
    output_stride: int = 8  # 8, 16 or 32
    blocks: tuple[int, ...] = ()  # blocks per stage; () = the standard count for `depth`
    base_width: int = 64  # stage widths are base_width x (1, 2, 4, 8)
    stem_width: int = 32  # hidden width of the deep stem (its output is base_width)
    head_channels: int = 512  # width of the PPM, laterals, FPN convs and fusion conv
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_head: bool = True  # FCN head on C4, used for training only
    aux_channels: int = 512
    dropout: float = 0.1  # Dropout2d before both classifiers
    num_classes: int = 0  # the classifiers' outputs; in a Config always data.num_classes

    def __post_init__(self) -> None:
        _validate(self, "model")


@dataclass(frozen=True)
class DataConfig:
    """What the data is and how the published pipelines transform it (docs/SPEC.md, "Training
    recipe" and "Data on disk")."""

    dataset: str = "ade20k"  # voc, ade20k, cityscapes, folder, hf (Hugging Face datasets), demo
    num_classes: int = 150
    classes: tuple[str, ...] = ()  # class names; () = the dataset description's (data/info.py)
    train_split: str = "training"
    val_split: str = "validation"
    crop_size: tuple[int, int] = (512, 512)  # (height, width)
    base_scale: tuple[int, int] = (2048, 512)  # (long side, short side) the image is fitted into
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # crop retried until no class covers more than this
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255
    reduce_zero_label: bool = False  # ADE20K: 0 -> 255, k -> k - 1
    # dataset="hf": the columns of the Hugging Face dataset (scene_parse_150's names by default)
    hf_image_column: str = "image"
    hf_annotation_column: str = "annotation"
    hf_config: str = ""  # the Hub dataset's configuration (subset) name, "" = its default
    hf_revision: str = ""  # a Hub branch, tag or commit, "" = main
    num_workers: int = 4
    on_bad: str = "raise"  # a bad sample: "raise" (stop, naming the file) or "skip" (count it)

    def __post_init__(self) -> None:
        _validate(self, "data")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe: SGD, poly schedule, CE + 0.4 x auxiliary CE (docs/SPEC.md, "Training recipe")."""

    batch_size: int = 16  # global batch, kept whatever the hardware
    epochs: int = 130
    iters_per_epoch: int = 1263
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_power: float = 0.9
    min_lr: float = 1e-4
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6  # warmup starts at lr x warmup_ratio
    loss_weight: float = 1.0
    aux_loss_weight: float = 0.4
    class_weights: tuple[float, ...] = ()  # () = unweighted cross-entropy
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    amp: str = "none"  # none, bf16, fp16
    channels_last: bool = False
    compile: bool = False
    norm: str = "auto"  # auto (SyncBN with >1 process, else BN), batchnorm, syncbn
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50
    val_interval: int = 4000
    checkpoint_interval: int = 4000

    def __post_init__(self) -> None:
        _validate(self, "train")

    @property
    def max_iters(self) -> int:
        """Total iterations: epochs x iterations per epoch (docs/SPEC.md, "The 12 published results")."""
        return self.epochs * self.iters_per_epoch


@dataclass(frozen=True)
class TestConfig:
    """How a model is evaluated: whole-image at the base scale, or sliding window, +-TTA
    (docs/SPEC.md, "Test protocol").

    The one place the test-time options live: `upernet eval` / `predict` resolve their
    `--test.*` overrides (and the `--mode`, `--scales`, `--flip`, `--crop`, `--stride`
    shorthands) into it, and `evaluate` / `inference` / `predict_labels` read it. Checked when
    built, so a bad value is refused before any work.
    """

    mode: str = "whole"  # whole or slide
    scales: tuple[float, ...] = (1.0,)  # multi-scale: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = False
    # the sliding window (height, width); () = the training crop, data.crop_size (filled in by
    # Config), as published: the network is applied at the size it was trained at
    crop_size: tuple[int, ...] = ()
    stride: tuple[int, int] = (341, 341)

    def __post_init__(self) -> None:
        _validate(self, "test")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "test": TestConfig}


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # The published single-scale val mIoU (percent) for this recipe, None for small configs.
    reported_miou: float | None = None

    def __post_init__(self) -> None:
        """The checks across sections, and the two values one section takes from another."""
        n = self.data.num_classes
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"the configuration's name must be a non-empty string, got {self.name!r}")
        for section, cls in SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise ConfigError(f"{section} must be a {cls.__name__}, got "
                                  f"{type(getattr(self, section)).__name__}")
        if self.model.num_classes not in (0, n):  # set once, in data.num_classes
            raise ConfigError(f"model.num_classes={self.model.num_classes} differs from "
                              f"data.num_classes={n}: the class count is data.num_classes")
        if self.data.classes and len(self.data.classes) != n:
            raise ConfigError(f"data.classes names {len(self.data.classes)} classes for "
                              f"data.num_classes={n}")
        if self.train.class_weights and len(self.train.class_weights) != n:
            raise ConfigError(f"train.class_weights has {len(self.train.class_weights)} values "
                              f"for data.num_classes={n}")
        object.__setattr__(self, "model", dataclasses.replace(self.model, num_classes=n))
        if not self.test.crop_size:
            object.__setattr__(self, "test", dataclasses.replace(self.test,
                                                                 crop_size=self.data.crop_size))


# --------------------------------------------------------------------------------------------
# Checked values: every field's type and range, checked when a section is built (by name, by
# override, from a file), so a bad value is refused, naming the field, before any work


def _one_of(*options: typing.Any) -> tuple[typing.Callable, str]:
    names = [repr(o) for o in options]
    return (lambda v: v in options), " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)


_POSITIVE = (lambda v: v > 0), "positive"
_NOT_NEGATIVE = (lambda v: v >= 0), "0 or more"
_FRACTION = (lambda v: 0 < v <= 1), "in (0, 1]"
_BELOW_ONE = (lambda v: 0 <= v < 1), "in [0, 1)"
_SIZES = (lambda v: min(v) > 0), "positive sizes HxW (e.g. 512x512)"
_FACTORS = (lambda v: len(v) > 0 and min(v) > 0), "positive values (e.g. 0.5,1,1.5)"
_NAME = (lambda v: v.strip() != ""), "a non-empty name"
_RULES: dict[str, tuple[typing.Callable[[typing.Any], bool], str]] = {
    "model.depth": _one_of(18, 34, 50, 101), "model.stem": _one_of("deep", "plain"),
    "model.output_stride": _one_of(8, 16, 32),
    "model.blocks": ((lambda v: v == () or (len(v) == 4 and min(v) > 0)),
                     "() or 4 positive block counts"),
    "model.base_width": _POSITIVE, "model.stem_width": _POSITIVE,
    "model.head_channels": _POSITIVE, "model.aux_channels": _POSITIVE,
    "model.pool_scales": _FACTORS, "model.dropout": _BELOW_ONE, "model.num_classes": _NOT_NEGATIVE,
    "data.dataset": _one_of(*DATASETS, "folder", "hf"),  # described in data/info.py, or yours
    "data.num_classes": _POSITIVE, "data.train_split": _NAME, "data.val_split": _NAME,
    "data.crop_size": _SIZES, "data.base_scale": _SIZES,
    "data.ratio_range": ((lambda v: 0 < v[0] <= v[1]), "two factors 0 < min <= max (e.g. 0.5,2)"),
    "data.cat_max_ratio": _FRACTION, "data.flip_prob": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "data.std": _FACTORS, "data.hf_image_column": _NAME, "data.hf_annotation_column": _NAME,
    "data.num_workers": _NOT_NEGATIVE, "data.on_bad": _one_of("raise", "skip"),
    "train.batch_size": _POSITIVE, "train.epochs": _POSITIVE, "train.iters_per_epoch": _POSITIVE,
    "train.lr": _POSITIVE, "train.momentum": _BELOW_ONE, "train.weight_decay": _NOT_NEGATIVE,
    "train.lr_power": _NOT_NEGATIVE, "train.min_lr": _NOT_NEGATIVE,
    "train.warmup_iters": _NOT_NEGATIVE, "train.warmup_ratio": _FRACTION,
    "train.loss_weight": _NOT_NEGATIVE, "train.aux_loss_weight": _NOT_NEGATIVE,
    "train.class_weights": ((lambda v: not v or min(v) >= 0), "weights of 0 or more"),
    "train.ohem_thresh": _FRACTION, "train.ohem_min_kept": _NOT_NEGATIVE,
    "train.amp": _one_of("none", "bf16", "fp16"), "train.norm": _one_of("auto", "batchnorm", "syncbn"),
    "train.seed": _NOT_NEGATIVE, "train.log_interval": _POSITIVE,
    "train.val_interval": _NOT_NEGATIVE, "train.checkpoint_interval": _NOT_NEGATIVE,
    "test.mode": _one_of("whole", "slide"), "test.scales": _FACTORS, "test.stride": _SIZES,
    "test.crop_size": ((lambda v: v == () or (len(v) == 2 and min(v) > 0)),
                       "() (the training crop) or two positive sizes HxW (e.g. 512x512)"),
}


@functools.cache
def field_types(cls: type) -> dict[str, typing.Any]:
    """{field: type} of a section's dataclass."""
    return typing.get_type_hints(cls)


def keys_of(section: str, cls: type) -> str:
    """The keys one can set in a section (model.num_classes follows data.num_classes)."""
    return ", ".join(f"{section}.{f}" for f in field_types(cls) if f"{section}.{f}" != "model.num_classes")


def _validate(section: typing.Any, name: str) -> None:
    """Check (and normalise: lists -> tuples, ints -> floats) every field of a section."""
    for key, kind in field_types(type(section)).items():
        value = _check_value(getattr(section, key), kind, f"{name}.{key}")
        object.__setattr__(section, key, value)
        check, wanted = _RULES.get(f"{name}.{key}", (None, ""))
        if check is not None and not check(value):
            raise ConfigError(f"{name}.{key} must be {wanted}, got {value!r}")


def _parse_value(text: str, kind: typing.Any, key: str) -> typing.Any:
    """A command-line value ("0.02", "512x512", "true") as the field's type."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        sizes = text.replace("x", ",") if args[0] is int else text  # 512x512; "box" is a name
        items = [t.strip() for t in sizes.split(",") if t.strip()]
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{key} needs {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(t, args[0], key) for t in items)
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return low in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} is a bool (true/false), got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key} is {'an int' if kind is int else 'a float'}, got {text!r}") from None
    return text


def _check_value(value: typing.Any, kind: typing.Any, key: str) -> typing.Any:
    """`value` as a field of type `kind` (tuples of the right length, finite floats), or a
    ConfigError naming `key`."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key} must be a tuple, got {type(value).__name__} {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_check_value(v, args[0], key) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The published recipes (docs/SPEC.md, "The 12 published results" and "Training recipe")

def _dataset(name: str, **recipe: typing.Any) -> DataConfig:
    """The data section of a recipe: what the dataset's description says (classes, splits,
    reduce-zero-label; upernet_ref/data/info.py) plus the recipe's own sizes."""
    info = DATASETS[name]
    return DataConfig(dataset=name, num_classes=len(info.classes), train_split=info.splits[0],
                      val_split=info.splits[1], reduce_zero_label=info.reduce_zero_label, **recipe)


# A new dataset: its description in data/info.py, and its recipe here.
_DATASETS = {
    "voc": dict(
        data=_dataset("voc", crop_size=(512, 512), base_scale=(2048, 512)),
        train=TrainConfig(batch_size=16, epochs=60, iters_per_epoch=661),
        test=TestConfig(stride=(341, 341)),
    ),
    "ade20k": dict(
        data=_dataset("ade20k", crop_size=(512, 512), base_scale=(2048, 512)),
        train=TrainConfig(batch_size=16, epochs=130, iters_per_epoch=1263),
        test=TestConfig(stride=(341, 341)),
    ),
    "cityscapes": dict(
        data=_dataset("cityscapes", crop_size=(512, 1024), base_scale=(2048, 1024)),
        train=TrainConfig(batch_size=8, epochs=220, iters_per_epoch=372),
        test=TestConfig(stride=(341, 683)),
    ),
}

REPORTED_MIOU = {  # (depth, output_stride) -> mIoU, per dataset
    "voc": {(50, 8): 76.86, (50, 16): 77.48, (101, 8): 79.13, (101, 16): 77.88},
    "ade20k": {(50, 8): 43.02, (50, 16): 42.87, (101, 8): 44.92, (101, 16): 44.77},
    "cityscapes": {(50, 8): 79.08, (50, 16): 78.94, (101, 8): 80.39, (101, 16): 79.64},
}

# Reference parameter counts (BatchNorm, with the auxiliary head), docs/SPEC.md, "Published figures".
REPORTED_PARAMS = {
    50: {"voc": 68_781_962, "ade20k": 68_914_316, "cityscapes": 68_779_910},
    101: {"voc": 87_774_090, "ade20k": 87_906_444, "cityscapes": 87_772_038},
}
REPORTED_PARAMS_NO_AUX_ADE20K = {50: 64_117_750, 101: 83_109_878}

# Reference GMACs of one forward at 512x512 on ADE20K (docs/SPEC.md, "Published figures"):
# (depth, output_stride) -> (without the auxiliary head, with it); None where not published.
REPORTED_GMACS: dict[tuple[int, int], tuple[int | None, int]] = {
    (50, 8): (398, 417), (50, 16): (263, 268), (101, 8): (None, 495), (101, 16): (None, 288),
}


def _published(depth: int, output_stride: int, dataset: str) -> Config:
    parts = _DATASETS[dataset]
    data: DataConfig = parts["data"]
    return Config(
        name=f"upernet_r{depth}_os{output_stride}_{dataset}",
        model=ModelConfig(depth=depth, output_stride=output_stride),
        data=data,
        train=parts["train"],
        test=parts["test"],
        reported_miou=REPORTED_MIOU[dataset][(depth, output_stride)],
    )


PUBLISHED: dict[str, Config] = {
    c.name: c
    for c in (
        _published(depth, os_, ds)
        for ds in ("voc", "ade20k", "cityscapes")
        for depth in (50, 101)
        for os_ in (8, 16)
    )
}

# Small configurations: same architecture and recipe shape, shrunk for a laptop CPU.
SMALL: dict[str, Config] = {
    # The README's main job and the notebooks: trains on the embedded demo scenes in minutes.
    "upernet_small_demo": Config(
        name="upernet_small_demo",
        model=ModelConfig(depth=18, blocks=(1, 1, 1, 1), base_width=16, stem_width=16,
                          head_channels=32, aux_channels=32, output_stride=8),
        data=DataConfig(dataset="demo", num_classes=8, train_split="train", val_split="val",
                        crop_size=(64, 64), base_scale=(128, 96), num_workers=0),
        train=TrainConfig(batch_size=8, epochs=6, iters_per_epoch=50, lr=0.05,
                          log_interval=10, val_interval=100, checkpoint_interval=100),
        test=TestConfig(stride=(43, 43)),
    ),
    # Unit tests: the smallest network that still has every piece.
    "upernet_small_test": Config(
        name="upernet_small_test",
        model=ModelConfig(depth=18, blocks=(1, 1, 1, 1), base_width=8, stem_width=8,
                          head_channels=16, aux_channels=16, output_stride=8,
                          pool_scales=(1, 2, 3, 6)),
        data=DataConfig(dataset="demo", num_classes=8, train_split="train", val_split="val",
                        crop_size=(32, 32), base_scale=(64, 48), num_workers=0),
        train=TrainConfig(batch_size=4, epochs=1, iters_per_epoch=10, lr=0.05,
                          log_interval=1, val_interval=5, checkpoint_interval=5),
        test=TestConfig(stride=(21, 21)),
    ),
}

_ALL: dict[str, Config] = {**PUBLISHED, **SMALL}


def list_configs(published_only: bool = False) -> list[str]:
    """Names of the configurations, the 12 published recipes first."""
    return list(PUBLISHED) if published_only else list(_ALL)


def get_config(name: str | Config,
               overrides: typing.Sequence[str] | dict | None = None) -> Config:
    """The configuration called `name` (or `name` itself if it is already a Config), with
    `overrides` applied on top.

    Args:
        name: one of `list_configs()`. A configuration file (.json / .yaml: `upernet configs
            --dump`, a run folder's or model folder's config.json) is read by the shell:
            `upernet_ref.load_config(path, overrides)`, `--config FILE` on the command line.
        overrides: "section.field=value" strings or a {"section.field": value} dict, applied
            with type checks (see `override`).
    """
    if isinstance(name, Config):
        cfg = name
    elif str(name) in _ALL:
        cfg = _ALL[str(name)]
    else:
        raise ConfigKeyError(f"unknown configuration {str(name)!r}; valid names: "
                             f"{', '.join(_ALL)} (upernet configs describes them); a "
                             f"configuration file is read by upernet_ref.load_config(path)")
    return override(cfg, overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------
# Overrides ("train.lr=0.02" on the command line, {"train.lr": 0.02} in Python)


def override(cfg: Config, overrides: typing.Sequence[str] | dict | None) -> Config:
    """A copy of `cfg` with "section.field=value" overrides applied, each type- and
    range-checked as the sections are rebuilt (the checks every configuration goes through).

    Unknown keys and values of the wrong type raise with a message naming the key and what is
    valid. The class count is `data.num_classes` (the model's classifiers follow it).
    """
    if not overrides:
        return cfg
    bad = [item for item in overrides if not isinstance(overrides, dict) and "=" not in item]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form section.field=value")
    pairs = list(overrides.items()) if isinstance(overrides, dict) else [
        (key.strip().lstrip("-"), text) for key, text in (item.split("=", 1) for item in overrides)]
    values = to_dict(cfg)
    for key, value in pairs:
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigKeyError(f"unknown override {key!r}; keys look like "
                                 f"{', '.join(s + '.<field>' for s in SECTIONS)}")
        hints = field_types(type(getattr(cfg, section)))
        if key == "model.num_classes":
            raise ConfigKeyError(f"{key} follows data.num_classes: give data.num_classes={value}")
        if name not in hints:
            raise ConfigKeyError(f"unknown override {key!r}; valid {section} keys: "
                                 f"{keys_of(section, type(getattr(cfg, section)))}")
        values[section][name] = _parse_value(value, hints[name], key) if isinstance(value, str) else value
    return from_sections(cfg.name, values, cfg.reported_miou)


def from_sections(name: str | None, values: dict, reported_miou: float | None = None) -> Config:
    """The `Config` of `to_dict`'s sections, every field checked as its section is built."""
    return Config(name, *(cls(**values[s]) for s, cls in SECTIONS.items()), reported_miou=reported_miou)


def to_dict(cfg: Config) -> dict:
    """The configuration as plain JSON-able data (stored in checkpoints, config.json and logs),
    each value once: no model.num_classes (it is data.num_classes), test.crop_size () when it
    is the training crop."""
    values = dataclasses.asdict(cfg)
    del values["model"]["num_classes"]
    if cfg.test.crop_size == cfg.data.crop_size:
        values["test"]["crop_size"] = ()
    return values
