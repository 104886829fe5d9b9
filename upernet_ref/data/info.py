"""One description per dataset (docs/SPEC.md, "Data on disk"): what every other part reads.

A `DatasetInfo` holds a dataset's classes, palette, label table, splits, folder layout, terms of
use, preparation hint and Hugging Face Hub id. The datasets (`data/datasets.py`), the recipes
(`configs.py`), `predict`, the model card and `upernet data` all read `DATASETS[name]`, so a new
dataset is one entry here plus a recipe entry in `configs.py`.

- VOC: the 21 PASCAL VOC 2012 classes; palette = the devkit's bit-interleaved colour map
  (`voc_colormap`), the same one stored in every SegmentationClass PNG.
- ADE20K: the 150 SceneParsing classes in objectInfo150.csv order (first synonym of each entry,
  as mmsegmentation names them) and mmsegmentation's ADE20K palette (stored as hex below).
- Cityscapes: the 19 evaluated classes in train-id order, their official colours, and the
  official label id -> train id table (cityscapesscripts `labels.py`; other ids -> 255).
- demo: the embedded procedural scenes (`upernet_ref.demo_scenes` draws them).
- `label_lut`: the one 256-entry table per dataset that turns raw label values into training
  labels (0..C-1, 255 = ignore) and marks every other value as an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255  # VOC boundaries, ADE20K "other" after reduce-zero-label, Cityscapes void

RGB = tuple[int, int, int]


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC devkit colour map: bits of the index spread over R, G, B (MSB first)."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


def _hex_palette(text: str) -> tuple[RGB, ...]:
    """'787878b47878...' -> ((120, 120, 120), (180, 120, 120), ...)."""
    return tuple((int(text[i: i + 2], 16), int(text[i + 2: i + 4], 16), int(text[i + 4: i + 6], 16))
                 for i in range(0, len(text), 6))


def label_lut(num_classes: int, reduce_zero_label: bool = False,
              id_map: dict[int, int] | None = None, num_ids: int = 0) -> np.ndarray:
    """A 256-entry table raw value -> training label; -1 marks a value that is an error.

    Plain: 0..C-1 and 255 kept. `reduce_zero_label`: 0 -> 255, k -> k-1 for k in 1..C.
    `id_map` (Cityscapes): ids in the map -> their train id, the other ids 0..num_ids-1 -> 255.
    """
    lut = np.full(256, -1, dtype=np.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if id_map is not None:
        lut[:num_ids] = IGNORE_INDEX
        for raw, train_id in id_map.items():
            lut[raw] = train_id
    elif reduce_zero_label:
        lut[0] = IGNORE_INDEX
        lut[1: num_classes + 1] = np.arange(num_classes)
    else:
        lut[:num_classes] = np.arange(num_classes)
    return lut


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as the code needs to know it; `name` is its `data.dataset` value."""

    name: str
    title: str
    classes: tuple[str, ...]
    palette: tuple[RGB, ...]
    splits: tuple[str, ...]  # (train, val, others...) as the folders / lists name them
    layout: str  # the root to pass and what is under it
    licence: str  # the data's own terms, which weights trained on it are held to carry
    prepare: str  # what to do before training (download, `upernet data prepare ...`)
    hub_id: str | None = None  # the Hugging Face Hub dataset, where one exists
    reduce_zero_label: bool = False  # raw 0 is "other" (ignored), k -> k - 1
    id_to_train_id: dict[int, int] | None = None  # raw ids -> train ids (others 255)
    num_ids: int = 0  # raw ids 0..num_ids-1 that `id_to_train_id` may leave out (-> 255)

    def lut(self) -> np.ndarray:
        """The raw value -> training label table of the files on disk (`label_lut`)."""
        return label_lut(len(self.classes), self.reduce_zero_label, self.id_to_train_id,
                         self.num_ids)


ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag")

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo(
        "voc", "PASCAL VOC 2012 + SBD",
        ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
         "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
         "sheep", "sofa", "train", "tvmonitor"),
        tuple(voc_colormap(21)), ("trainaug", "val", "train", "trainval"),
        "VOCdevkit/VOC2012: JPEGImages/, SegmentationClass/ (palette PNGs, 255 = boundary), "
        "ImageSets/Segmentation/<split>.txt; trainaug reads SegmentationClassAug/",
        "PASCAL VOC 2012 (+ SBD): images under Flickr's terms, annotations under the VOC "
        "challenge's (research use)",
        "download VOC 2012 and SBD, then `upernet data prepare voc-aug` (data/README.md)"),
    DatasetInfo(
        "ade20k", "ADE20K (MIT SceneParsing)", ADE20K_CLASSES, _hex_palette(
            "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33"
            "ff06528fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff"
            "08ffd607ffe0ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ff"
            "eb0cffa0961400a3ff8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff"
            "0bc8c8ff520000fff5003dff00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad"
            "0a00ffadff0000ff99ff5c00ff00ffff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc2"
            "00ff52000aff0070ff3300ff00c2ff007aff00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa"
            "8500ff00ff5cb800ffff001f00b8ff00d6ffff00705cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3"
            "ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff5000abed4d6ff0000ccff1400ffffff000099ff0029ff"
            "00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cffb8ff000085ffffd60019c2c266ff005c00ff"),
        ("training", "validation"),
        "ADEChallengeData2016: images/<split>/*.jpg, annotations/<split>/*.png (0 = other, 1..150)",
        "ADE20K (MIT CSAIL): images under the ADE20K terms of use (research, non-commercial)",
        "download ADEChallengeData2016.zip; no preparation",
        hub_id="zhoubolei/scene_parse_150", reduce_zero_label=True),
    DatasetInfo(
        "cityscapes", "Cityscapes (gtFine)",
        ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
         "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
         "motorcycle", "bicycle"),
        ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
         (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
         (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
         (0, 80, 100), (0, 0, 230), (119, 11, 32)),
        ("train", "val", "test"),
        "the folder holding leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
        "gtFine/<split>/<city>/*_gtFine_labelIds.png (ids 0..33)",
        "Cityscapes: its licence allows non-commercial research use only",
        "register and download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip; "
        "optional `upernet data prepare cityscapes` for *_labelTrainIds.png",
        # official label ids of the 19 evaluated classes -> train ids; the other ids 0..33
        # (unlabeled, ego vehicle, ..., caravan, trailer; license plate -1 stored as 255) -> 255
        id_to_train_id={7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18},
        num_ids=34),
    DatasetInfo(
        "demo", "the embedded demo scenes",
        ("sky", "ground", "disc", "square", "triangle", "bar", "ring", "cross"),
        ((70, 130, 180), (140, 110, 60), (220, 20, 60), (250, 170, 30), (0, 160, 80),
         (150, 60, 200), (255, 120, 180), (0, 200, 220)),
        ("train", "val", "test"), "none: generated by upernet_ref.demo_scenes",
        "the embedded demo scenes, generated by upernet_ref (no third-party data)",
        "nothing to download"),
)}


def class_names(dataset: str, num_classes: int, names: Sequence[str] = ()) -> tuple[str, ...]:
    """The class names of a model: `names` when given (`data.classes`), else the dataset's own
    when it has `num_classes` of them, else class_0, class_1, ..."""
    if names:
        return tuple(names)
    info = DATASETS.get(dataset)
    if info is not None and len(info.classes) == num_classes:
        return info.classes
    return tuple(f"class_{i}" for i in range(num_classes))


def class_palette(dataset: str, num_classes: int) -> tuple[RGB, ...]:
    """The colours of `num_classes` classes: the dataset's own, else the VOC colour map."""
    info = DATASETS.get(dataset)
    if info is not None and len(info.palette) == num_classes:
        return info.palette
    return tuple(voc_colormap()[:num_classes])


def describe_values(values: Sequence[int] | np.ndarray) -> str:
    """[0, 1, 2, 5, 6, 255] -> '0..2, 5, 6, 255' (for messages)."""
    values, parts, i = sorted(int(v) for v in values), [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{values[i]}..{values[j]}")
        else:
            parts += [str(v) for v in values[i: j + 1]]
        i = j + 1
    return ", ".join(parts)
