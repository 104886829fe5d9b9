"""Typed, frozen configurations: the 12 published UPerNet recipes and small CPU configs.

Every number here comes from the published sssegmentation UPerNet model card, summarised with
its sources in `docs/SPEC.md` ("The 12 published results", "Training recipe", "Published
figures"); where the paper's own setting differs, `docs/SPEC.md` ("Paper vs published recipe")
says so. A configuration is four frozen dataclasses
(model, data, train, test) bundled in a `Config`. The published recipes are named
`upernet_r{50,101}_os{8,16}_{voc,ade20k,cityscapes}`; the small ones, for laptops, notebooks and
tests, are `upernet_small_demo` and `upernet_small_test`.

    >>> cfg = get_config("upernet_r50_os8_ade20k")
    >>> cfg.train.max_iters
    164190
    >>> override(cfg, ["train.lr=0.02", "model.output_stride=16"]).train.lr
    0.02
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from upernet_ref.errors import UsageError


class ConfigKeyError(UsageError, KeyError):
    """An unknown configuration name or override key; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would print the repr, newlines escaped
        return str(self.args[0]) if self.args else ""


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
    num_classes: int = 150


@dataclass(frozen=True)
class DataConfig:
    """What the data is and how the published pipelines transform it (docs/SPEC.md, "Training recipe" and "Data on disk")."""

    dataset: str = "ade20k"  # voc, ade20k, cityscapes, folder, hf (Hugging Face datasets), demo
    num_classes: int = 150
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
    num_workers: int = 4
    on_bad: str = "raise"  # a bad sample: "raise" (stop, naming the file) or "skip" (count it)

    def __post_init__(self) -> None:  # checked when built: refused before any work
        if self.on_bad not in ("raise", "skip"):
            raise ValueError(f"data.on_bad must be 'raise' or 'skip', got {self.on_bad!r}")


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
    crop_size: tuple[int, int] = (512, 512)  # sliding window (height, width)
    stride: tuple[int, int] = (341, 341)

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"test.mode must be 'whole' or 'slide', got {self.mode!r}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"test.scales must be positive factors (e.g. 0.5,1,1.5), "
                             f"got {self.scales!r}")
        for name in ("crop_size", "stride"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) <= 0:
                raise ValueError(f"test.{name} must be two positive sizes HxW (e.g. 512x512), "
                                 f"got {value!r}")


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # The published single-scale val mIoU (percent) for this recipe, None for small configs.
    reported_miou: float | None = None


# --------------------------------------------------------------------------------------------
# The published recipes (docs/SPEC.md, "The 12 published results" and "Training recipe")

_DATASETS = {
    "voc": dict(
        data=DataConfig(dataset="voc", num_classes=21, train_split="trainaug", val_split="val",
                        crop_size=(512, 512), base_scale=(2048, 512)),
        train=TrainConfig(batch_size=16, epochs=60, iters_per_epoch=661),
        test=TestConfig(crop_size=(512, 512), stride=(341, 341)),
    ),
    "ade20k": dict(
        data=DataConfig(dataset="ade20k", num_classes=150, train_split="training",
                        val_split="validation", crop_size=(512, 512), base_scale=(2048, 512),
                        reduce_zero_label=True),
        train=TrainConfig(batch_size=16, epochs=130, iters_per_epoch=1263),
        test=TestConfig(crop_size=(512, 512), stride=(341, 341)),
    ),
    "cityscapes": dict(
        data=DataConfig(dataset="cityscapes", num_classes=19, train_split="train",
                        val_split="val", crop_size=(512, 1024), base_scale=(2048, 1024)),
        train=TrainConfig(batch_size=8, epochs=220, iters_per_epoch=372),
        test=TestConfig(crop_size=(512, 1024), stride=(341, 683)),
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
        model=ModelConfig(depth=depth, output_stride=output_stride, num_classes=data.num_classes),
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
                          head_channels=32, aux_channels=32, output_stride=8, num_classes=8),
        data=DataConfig(dataset="demo", num_classes=8, train_split="train", val_split="val",
                        crop_size=(64, 64), base_scale=(128, 96), num_workers=0),
        train=TrainConfig(batch_size=8, epochs=6, iters_per_epoch=50, lr=0.05,
                          log_interval=10, val_interval=100, checkpoint_interval=100),
        test=TestConfig(crop_size=(64, 64), stride=(43, 43)),
    ),
    # Unit tests: the smallest network that still has every piece.
    "upernet_small_test": Config(
        name="upernet_small_test",
        model=ModelConfig(depth=18, blocks=(1, 1, 1, 1), base_width=8, stem_width=8,
                          head_channels=16, aux_channels=16, output_stride=8, num_classes=8,
                          pool_scales=(1, 2, 3, 6)),
        data=DataConfig(dataset="demo", num_classes=8, train_split="train", val_split="val",
                        crop_size=(32, 32), base_scale=(64, 48), num_workers=0),
        train=TrainConfig(batch_size=4, epochs=1, iters_per_epoch=10, lr=0.05,
                          log_interval=1, val_interval=5, checkpoint_interval=5),
        test=TestConfig(crop_size=(32, 32), stride=(21, 21)),
    ),
}

_ALL: dict[str, Config] = {**PUBLISHED, **SMALL}


def list_configs(published_only: bool = False) -> list[str]:
    """Names of the configurations, the 12 published recipes first."""
    return list(PUBLISHED) if published_only else list(_ALL)


def get_config(name: str | Config, overrides: typing.Sequence[str] | dict | None = None) -> Config:
    """The configuration called `name` (or `name` itself if it is already a Config).

    Args:
        name: one of `list_configs()`.
        overrides: "section.field=value" strings or a {"section.field": value} dict, applied
            with type checks (see `override`).
    """
    if isinstance(name, Config):
        cfg = name
    else:
        if name not in _ALL:
            raise ConfigKeyError(f"unknown configuration {name!r}; valid names: "
                                 f"{', '.join(_ALL)} (upernet configs describes them)")
        cfg = _ALL[name]
    return override(cfg, overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------
# Type-checked overrides, for the command line ("train.lr=0.02") and for Python ({...: 0.02})

_SECTIONS = ("model", "data", "train", "test")


def _parse_value(text: str, kind: typing.Any, key: str) -> typing.Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        items = [t for t in text.replace("x", ",").split(",") if t.strip()] if text.strip() else []
        item_type = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:  # fixed-length tuple
            if len(items) != len(args):
                raise ValueError(f"{key} needs {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(t.strip(), item_type, key) for t in items)
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} is a bool (true/false), got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} is an int, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} is a float, got {text!r}") from None
    return text


def _check_value(value: typing.Any, kind: typing.Any, key: str) -> typing.Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{key} must be a tuple, got {type(value).__name__} {value!r}")
        args = typing.get_args(kind)
        return tuple(_check_value(v, args[0], key) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise TypeError(f"{key} must be int, got bool {value!r}")
    if not isinstance(value, kind):
        raise TypeError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def override(cfg: Config, overrides: typing.Sequence[str] | dict | None) -> Config:
    """A copy of `cfg` with "section.field=value" overrides applied, each type-checked.

    Unknown keys and values of the wrong type raise with a message listing what is valid.
    `model.num_classes` follows `data.num_classes` when only the latter is given.
    """
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form section.field=value")
            key, text = item.split("=", 1)
            pairs.append((key.strip().lstrip("-"), text))
    changes: dict[str, dict[str, typing.Any]] = {}
    for key, value in pairs:
        section, _, name = key.partition(".")
        if section not in _SECTIONS or not name:
            raise ConfigKeyError(f"unknown override {key!r}; keys look like "
                           f"{', '.join(s + '.<field>' for s in _SECTIONS)}")
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            valid = ", ".join(f"{section}.{f.name}" for f in dataclasses.fields(sub))
            raise ConfigKeyError(f"unknown override {key!r}; valid {section} keys: {valid}")
        kind = hints[name]
        value = _parse_value(value, kind, key) if isinstance(value, str) else _check_value(value, kind, key)
        changes.setdefault(section, {})[name] = value
    if "num_classes" in changes.get("data", {}) and "num_classes" not in changes.get("model", {}):
        changes.setdefault("model", {})["num_classes"] = changes["data"]["num_classes"]
    new = {s: dataclasses.replace(getattr(cfg, s), **c) for s, c in changes.items()}
    return dataclasses.replace(cfg, **new)


def to_dict(cfg: Config) -> dict:
    """The configuration as plain JSON-able data (stored in checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Inverse of `to_dict` (lists become tuples again)."""
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    return Config(
        name=data["name"],
        model=build(ModelConfig, data.get("model", {})),
        data=build(DataConfig, data.get("data", {})),
        train=build(TrainConfig, data.get("train", {})),
        test=build(TestConfig, data.get("test", {})),
        reported_miou=data.get("reported_miou"),
    )
