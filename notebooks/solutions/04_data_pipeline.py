# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Data: datasets on disk, label conventions, and the published pipelines
#
# A segmentation model is only as right as the labels it is fed. This notebook follows one item
# from the disk to the batch the network sees:
#
# 1. the **data contract** every dataset in `upernet_ref` follows, on the embedded demo scenes,
# 2. how **PASCAL VOC, ADE20K and Cityscapes** are laid out on disk and read,
# 3. their **label conventions**: 255 = ignore, ADE20K's *reduce-zero-label*, Cityscapes' *train ids*,
# 4. the published **training pipeline** (docs/SPEC.md, "Training recipe"), one step at a time,
#    image + palette overlay, and its geometric steps rebuilt by hand with the same random draws,
# 5. the **test pipeline**, and
# 6. **reproducible randomness** in a DataLoader.
#
# The printed numbers and every picture come from the embedded demo scenes (drawn by code, free to
# redistribute), so they are the same on every machine. The benchmarks' photos are not shown in
# the committed outputs: their licences (Cityscapes' in particular) forbid redistributing them.
# To look at your own copy, point `UPERNET_REALDATA` at a folder with `voc/VOCdevkit/VOC2012`,
# `ade20k/ADEChallengeData2016` and `cityscapes/`; section 2 then describes one sample of each.

# %%
# %matplotlib inline
# %config InlineBackend.figure_formats = ["jpeg"]
import inspect
import io
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from upernet_ref import course
from upernet_ref.data import transforms as T
from upernet_ref.configs import get_config
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes

_ = torch.manual_seed(0)
device = course.pick_device()  # (nothing here needs it: data is CPU work)
demo_cfg = get_config("upernet_small_demo").data
REALDATA = Path(os.environ.get("UPERNET_REALDATA", "/nonexistent")).expanduser()
HAVE_REAL = REALDATA.is_dir()


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    # float 0..255 (after photometric) -> uint8; uint8 stays as it is
    return image if image.dtype == torch.uint8 else image.round().clamp(0, 255).to(torch.uint8)


def show(pairs, titles, palette, height=2.6):
    # one column per (image uint8 (3,H,W), mask (H,W)): the image above, the overlay below;
    # `palette` is one palette, or a list with one palette per column
    palettes = palette if isinstance(palette[0][0], (list, tuple)) else [palette] * len(pairs)
    fig, axes = plt.subplots(2, len(pairs), figsize=(height * 1.35 * len(pairs), 2 * height), squeeze=False)
    for col, ((image, mask), title, pal) in enumerate(zip(pairs, titles, palettes)):
        axes[0, col].imshow(image.permute(1, 2, 0).numpy())
        axes[1, col].imshow(T.overlay(image, mask, pal, alpha=0.55).permute(1, 2, 0).numpy())
        axes[0, col].set_title(f"{title}\n{mask.shape[0]}x{mask.shape[1]}", fontsize=9)  # (H x W)
        for ax in axes[:, col]:
            ax.axis("off")
    plt.tight_layout()
    course.class_legend(fig, DEMO_CLASSES, palettes[0])
    plt.show()


# %% [markdown]
# ## 1. The data contract, on the embedded demo scenes
#
# Every dataset returns `(image, mask)`: `image` a `uint8` tensor `(3, H, W)` in RGB and `mask` an
# `int64` tensor `(H, W)` of **training** labels `0..C-1`, with **255 = ignore** (docs/DESIGN.md).
# Each dataset also exposes `classes`, `palette`, `ignore_index` and `describe(i)`.
#
# `DemoScenes` is a dataset shipped as code: item *i* is drawn on the fly from a random generator
# seeded with (seed, split, i), so there is nothing to download and every process sees the same
# item. Sky, ground and six shapes painted in depth order, each class with its own colour and
# texture; disc and ring (and triangle and cross) have similar colours, so the network has to use
# shape. Like VOC's outlines, a one-pixel boundary around every region is 255, and so is the odd
# blotch of clutter.

# %%
demo = DemoScenes("train")
image, mask = demo[0]
print("items:", len(demo), "| val items:", len(DemoScenes("val")))
print("image:", image.dtype, tuple(image.shape), "| mask:", mask.dtype, tuple(mask.shape))
print("classes:", demo.classes)
print("labels in item 0:", mask.unique().tolist())
print("describe(0):", demo.describe(0))
assert torch.equal(DemoScenes("train")[0][1], mask)  # the same item in every process

# %%
masks = torch.stack([demo[i][1] for i in range(100)])
share = torch.bincount(masks.flatten(), minlength=256).float() / masks.numel()
for c, name in enumerate(DEMO_CLASSES):
    print(f"{c} {name:<9} {share[c]:.3f}")
print(f"255 ignore    {share[255]:.3f}")

# %%
show([demo[i] for i in range(5)], [f"train[{i}]" for i in range(5)], DEMO_PALETTE)

# %% [markdown]
# ## 2. The three benchmarks on disk (docs/SPEC.md, "Data on disk")
#
# ```
# VOCdevkit/VOC2012/                       PASCAL VOC 2012: 21 classes (0 = background)
#   JPEGImages/2007_000032.jpg
#   SegmentationClass/2007_000032.png      palette ("P") PNG: the pixel value is the class index
#   SegmentationClassAug/*.png             SBD converted to PNG (the 10,582-image "trainaug" set)
#   ImageSets/Segmentation/{train,val,trainaug}.txt
# ADEChallengeData2016/                    ADE20K SceneParsing: 150 classes
#   images/{training,validation}/ADE_val_00000001.jpg
#   annotations/{training,validation}/ADE_val_00000001.png   grey: 0 = other, 1..150
# cityscapes/                              Cityscapes fine: 19 evaluated classes
#   leftImg8bit/{train,val,test}/aachen/aachen_000000_000019_leftImg8bit.png   2048x1024
#   gtFine/{train,val,test}/aachen/aachen_000000_000019_gtFine_labelIds.png    ids 0..33
#                                          (..._gtFine_labelTrainIds.png: precomputed 0..18, 255)
# ```
#
# `upernet_ref.data.datasets` reads all three with torchvision's decoders and turns the raw label
# values into training labels with one 256-entry look-up table per dataset. A raw value the table
# does not know is an error that names the file: labels are never clipped silently.

# %%
from upernet_ref.data.datasets import ADE20K, Cityscapes, VOCSegmentation, decode_label
from upernet_ref.data.info import DATASETS, label_lut  # one description per dataset
CITYSCAPES_ID_TO_TRAIN_ID, VOC_PALETTE = DATASETS["cityscapes"].id_to_train_id, DATASETS["voc"].palette

print(inspect.getsource(label_lut))

# %% [markdown]
# ### The label conventions, on small arrays
#
# **VOC** stores a *palette* PNG: what is saved per pixel is the class index (0..20, and 255 for
# the outline around each object); the colours are only the file's palette. Reading it as RGB
# would be wrong, so labels are decoded as indices.

# %%
voc_raw = np.array([[0, 0, 15, 15], [0, 255, 15, 15], [12, 12, 255, 0]], dtype=np.uint8)
png = Image.fromarray(voc_raw, mode="P")
png.putpalette([v for rgb in VOC_PALETTE for v in rgb])
buffer = io.BytesIO()
png.save(buffer, format="PNG")
decoded = decode_label(buffer.getvalue(), "tiny_voc.png")
print("colour of index 15 (person):", VOC_PALETTE[15])
print("decoded indices:\n", decoded)
voc_train = label_lut(21)[decoded]
print("training labels (unchanged; 255 = ignore):\n", voc_train)
assert (voc_train == voc_raw).all()

# %% [markdown]
# **ADE20K** annotations are grey images with 0 = "other" (unlabelled) and 1..150 = the classes.
# *Reduce-zero-label* makes "other" the ignore value and shifts the classes down: 0 -> 255,
# k -> k - 1.

# %%
ade_raw = np.array([[0, 1, 2], [150, 0, 3]], dtype=np.uint8)
ade_train = label_lut(150, reduce_zero_label=True)[ade_raw]
print("raw:\n", ade_raw)
print("training labels:\n", ade_train)
assert ade_train.tolist() == [[255, 0, 1], [149, 255, 2]]

# %% [markdown]
# **Cityscapes** `*_labelIds.png` hold 34 official ids; only 19 are evaluated. Each of those maps
# to a *train id* 0..18, every other id (unlabelled, ego vehicle, rectification border, ...) to 255.

# %%
city_raw = np.array([[7, 8, 26, 0], [33, 24, 1, 11]], dtype=np.uint8)
city_lut = label_lut(19, id_map=CITYSCAPES_ID_TO_TRAIN_ID, num_ids=34)
city_train = city_lut[city_raw]
print("ids -> train ids:", {k: v for k, v in list(CITYSCAPES_ID_TO_TRAIN_ID.items())[:6]}, "...")
print("raw:\n", city_raw)
print("training labels:\n", city_train)
assert city_train.tolist() == [[0, 1, 13, 255], [18, 11, 255, 2]]

# %% [markdown]
# ### Your real samples (when `UPERNET_REALDATA` is set)
#
# The next cell reads one sample of each benchmark from *your* copy (the folder in
# `UPERNET_REALDATA`) through its dataset class and describes it in words: file, size, classes.
# It shows no pixels, so no photo ends up in a committed notebook; to look at one, run
# `show([ds[i]], [name], ds.palette)` yourself and do not commit the output. Its text depends on
# which data is there, so the test run ignores it (`# NBVAL_IGNORE_OUTPUT`).

# %%
# NBVAL_IGNORE_OUTPUT
real = []  # (name, dataset, index)
if HAVE_REAL:
    real = [("VOC val", VOCSegmentation(REALDATA / "voc/VOCdevkit/VOC2012", "val"), 0),
            ("ADE20K val", ADE20K(REALDATA / "ade20k/ADEChallengeData2016", "validation"), 0),
            ("Cityscapes train", Cityscapes(REALDATA / "cityscapes", "train"), 0)]
    for name, ds, i in real:
        image, mask = ds[i]
        labels = [ds.classes[c] for c in mask.unique().tolist() if c != 255]
        print(f"{name}: {ds.describe(i).replace(str(REALDATA) + '/', '')}")
        print(f"   image {tuple(image.shape)}, {len(labels)} classes: {', '.join(labels[:8])}"
              f"{' ...' if len(labels) > 8 else ''}; ignored {(mask == 255).float().mean():.3f}")
else:
    print("UPERNET_REALDATA is not set (or not a folder): no real samples described")

# %% [markdown]
# ## 3. The training pipeline, step by step
#
# docs/SPEC.md, "Training recipe", in the reference's order:
#
# | step | what | image | mask |
# |---|---|---|---|
# | rescale | fit into `base_scale` x ratio, ratio ~ U(0.5, 2), aspect kept | bilinear + antialias, uint8 | nearest |
# | crop | random `crop_size`, redrawn up to 10x while one class covers >= 75% | slice | slice |
# | flip | left-right with p = 0.5 | jointly | jointly |
# | photometric | brightness, contrast, saturation, hue, each p = 0.5 | float32 0..255 | - |
# | normalize | (x - mean) / std, ImageNet statistics on RGB 0..255 | float32 | - |
# | pad | up to `crop_size`, bottom/right | 0 | 255 |
#
# The image stays `uint8` through the geometric steps and the mask is resized with nearest
# neighbour, so no label value is ever invented. Every random number comes from torch's generator.

# %%
print(inspect.getsource(T.TrainTransform.__call__))

# %%
print("demo data config: base_scale", demo_cfg.base_scale, "crop_size", demo_cfg.crop_size,
      "ratio_range", demo_cfg.ratio_range, "cat_max_ratio", demo_cfg.cat_max_ratio)
_ = torch.manual_seed(0)
trace = []
x, y = T.train_transform(demo_cfg)(*demo[1], trace=trace)
for name, step_image, step_mask in trace:
    print(f"{name:<12} image {str(step_image.dtype):<14} {tuple(step_image.shape)}   mask {tuple(step_mask.shape)}")
print("output:", x.dtype, tuple(x.shape), y.dtype, tuple(y.shape))
assert tuple(x.shape[1:]) == tuple(y.shape) == demo_cfg.crop_size


# %%
def picture(name, image):
    return T.denormalize(image, demo_cfg) if name in ("normalize", "pad") else as_uint8(image)


pairs = [demo[1]] + [(picture(n, i), m) for n, i, m in trace]
show(pairs, ["input"] + [n for n, _, _ in trace], DEMO_PALETTE, height=2.2)

# %% [markdown]
# The same steps with the published ADE20K data config (crop 512x512, base scale 2048x512), on a
# demo scene drawn at 384x512 (an ADE20K-like size):

# %%
ade_cfg = get_config("upernet_r50_os8_ade20k").data
source = DemoScenes("train", size=(384, 512))
palette = source.palette
_ = torch.manual_seed(0)
trace = []
_ = T.train_transform(ade_cfg)(*source[0], trace=trace)
pairs = [source[0]] + [(T.denormalize(i, ade_cfg) if n in ("normalize", "pad") else as_uint8(i), m)
                       for n, i, m in trace]
print([(n, tuple(i.shape[1:])) for n, i, _ in trace])
show(pairs, ["input"] + [n for n, _, _ in trace], palette, height=2.2)

# %% [markdown]
# ### Exercise 1 (warm-up, checked): the flip
#
# Write `hflip_pair(image, mask)`: the (3, H, W) image and its (H, W) mask mirrored left-right,
# together. `check_hflip_pair` tries three pairs.

# %%
def hflip_pair(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ### BEGIN SOLUTION
    return image.flip(-1), mask.flip(-1)
    ### END SOLUTION


course.check_hflip_pair(hflip_pair)

# %% [markdown]
# ### Exercise 2 (core, checked): the rescale, before the steps by hand
#
# Write `rescale_size`: the (height, width) of an image fitted into `scale` = (long, short) with
# its aspect ratio kept (the factor is the smaller of long / long side and short / short side;
# round as `int(x + 0.5)`, like mmcv). `check_rescale_size` tries sixteen images and scales,
# among them one where the long side decides and an exact .5.

# %%
def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    ### BEGIN SOLUTION
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)
    ### END SOLUTION


course.check_rescale_size(rescale_size)

# %% [markdown]
# ### Exercise 3 (stretch, checked): the class-ratio test of the crop
#
# The crop is redrawn (up to 10 times) unless it holds at least two classes and none of them
# covers `cat_max_ratio` or more of its *labelled* pixels (255 does not count). Write that test:
# `crop_is_acceptable(mask_crop, cat_max_ratio)` is True when the crop is kept.
# `check_crop_is_acceptable` tries nineteen crops, among them a class at exactly the ratio, an
# all-ignored crop and a single-class one.

# %%
def crop_is_acceptable(mask: torch.Tensor, cat_max_ratio: float) -> bool:
    ### BEGIN SOLUTION
    counts = torch.bincount(mask.flatten(), minlength=256)
    counts[255] = 0  # the ignore label is not a class
    present = counts[counts > 0]
    return len(present) > 1 and present.max().item() / present.sum().item() < cat_max_ratio
    ### END SOLUTION


course.check_crop_is_acceptable(crop_is_acceptable)

# %% [markdown]
# ### The geometric steps by hand, with the same random draws
#
# Rescale, crop and flip draw, in this order, one uniform ratio, one (top, left) corner per crop
# attempt and one coin, all from torch's global generator. Written out by hand and started from
# the same seed, they must give exactly the package's images and masks (the `flip` step of the
# trace), draw for draw:

# %%
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def geometry_by_hand(image, mask, cfg):
    # rescale: ratio ~ U(ratio_range); fit into base_scale x ratio with the aspect ratio kept
    low, high = cfg.ratio_range
    ratio = low + (high - low) * torch.rand(()).item()
    scale = (int(cfg.base_scale[0] * ratio), int(cfg.base_scale[1] * ratio))
    h, w = mask.shape
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = [int(h * factor + 0.5), int(w * factor + 0.5)]
    image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], size, interpolation=InterpolationMode.NEAREST)[0]
    # crop: redraw (up to 10 times) while one class covers >= cat_max_ratio of the labelled pixels
    h, w = mask.shape
    ch, cw = min(cfg.crop_size[0], h), min(cfg.crop_size[1], w)

    def corner():
        return int(torch.randint(0, h - ch + 1, ()).item()), int(torch.randint(0, w - cw + 1, ()).item())

    top, left = corner()
    if cfg.cat_max_ratio < 1.0:
        for _ in range(10):
            counts = torch.bincount(mask[top:top + ch, left:left + cw].reshape(-1), minlength=256)
            counts[cfg.ignore_index] = 0
            present = counts[counts > 0]
            if len(present) > 1 and present.max().item() / present.sum().item() < cfg.cat_max_ratio:
                break
            top, left = corner()
    image, mask = image[:, top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]
    # flip: left-right with probability flip_prob, image and mask together
    if torch.rand(()).item() < cfg.flip_prob:
        image, mask = image.flip(-1), mask.flip(-1)
    return image, mask, (ratio, (top, left))


for seed in range(8):
    image, mask = T.check_pair(*demo[seed])
    _ = torch.manual_seed(seed)
    trace = []
    T.train_transform(demo_cfg)(image, mask, trace=trace)
    _, package_image, package_mask = trace[2]  # after rescale, crop and flip
    _ = torch.manual_seed(seed)
    ours_image, ours_mask, (ratio, corner_) = geometry_by_hand(image, mask, demo_cfg)
    assert torch.equal(ours_image, package_image) and torch.equal(ours_mask, package_mask)
    print(f"seed {seed}: ratio {ratio:.3f}, crop at {corner_}, {tuple(ours_mask.shape)}: "
          f"by hand == rescale -> crop -> flip")

# %% [markdown]
# ### Random rescale
#
# The image is fitted into (long, short) = `base_scale` x ratio: the scale factor is
# min(long / long side, short / short side), so the aspect ratio is kept. For the published
# ADE20K recipe, `base_scale` = (2048, 512) puts the short side of a typical 683x512 photo at 512 x ratio.

# %%
print("ADE20K 683x512 at ratio 0.5, 1, 2:",
      [T.rescale_size(512, 683, (2048 * r, 512 * r)) for r in (0.5, 1.0, 2.0)])
print("Cityscapes 2048x1024 at ratio 0.5, 1, 2:",
      [T.rescale_size(1024, 2048, (2048 * r, 1024 * r)) for r in (0.5, 1.0, 2.0)])
_ = torch.manual_seed(0)
image, mask = demo[2]
rescaled = [T.random_rescale(image, mask, demo_cfg.base_scale, demo_cfg.ratio_range) for _ in range(4)]
print("demo 128x96, four draws:", [tuple(i.shape[1:]) for i, _ in rescaled])
for _, m in rescaled:  # nearest neighbour: no new label values
    assert set(m.unique().tolist()) <= set(mask.unique().tolist())

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3), gridspec_kw={"width_ratios": [i.shape[2] for i, _ in rescaled]})
for ax, (i, m) in zip(axes, rescaled):
    ax.imshow(T.overlay(i, m, DEMO_PALETTE, alpha=0.4).permute(1, 2, 0).numpy())
    ax.set_title(f"{tuple(i.shape[1:])}", fontsize=9)
plt.show()


# %% [markdown]
# ### Crop with `cat_max_ratio`
#
# A plain random crop of a scene is often nearly all sky or all road. The reference redraws the
# crop (up to 10 times) until at least two classes are present and none covers 75% or more of its
# labelled pixels (255 does not count). Over many crops of the demo scenes:

# %%
def dominated(m, ratio=0.75):
    counts = torch.bincount(m.flatten(), minlength=256)[:255].float()
    counts = counts[counts > 0]
    return len(counts) < 2 or (counts.max() / counts.sum()).item() >= ratio


_ = torch.manual_seed(0)
items = [T.check_pair(*demo[i]) for i in range(40)]
for cat_max_ratio in (1.0, 0.75):
    crops = [T.random_crop(i, m, (32, 32), cat_max_ratio)[1] for i, m in items for _ in range(5)]
    print(f"cat_max_ratio {cat_max_ratio}: {np.mean([dominated(c) for c in crops]):.3f} of 32x32 crops dominated by one class")

# %% [markdown]
# ### Photometric distortion
#
# mmsegmentation's `PhotoMetricDistortion`: brightness + U(-32, 32), contrast x U(0.5, 1.5),
# saturation x U(0.5, 1.5) and hue + U(-18, 18) (of 180, OpenCV's unit; 36 degrees), each with
# probability 0.5, contrast before or after the HSV changes at random. Here it runs on float32
# tensors; the HSV changes use the same max/min/sextant decomposition as OpenCV.

# %%
_ = torch.manual_seed(1)
image, mask = demo[3]
variants = [(image, mask)] + [(as_uint8(T.photometric_distortion(image)), mask) for _ in range(5)]
show(variants, ["original"] + [f"draw {k}" for k in range(1, 6)], DEMO_PALETTE, height=2.0)
# a hue shift of 18 (of 180) is a tenth of a turn: torchvision's adjust_hue agrees
from torchvision.transforms.v2.functional import adjust_hue
diff = (T._adjust_hsv(image.float(), None, 18.0) - 255 * adjust_hue(image.float() / 255, 0.1)).abs().max()
print(f"max difference to torchvision adjust_hue: {diff:.4f}")
assert diff < 0.01

# %% [markdown]
# ### Normalize and pad
#
# Normalization uses the ImageNet statistics on the 0..255 scale (the backbone was pretrained with
# them). Padding comes after, so the padded image is exactly 0 (= the mean colour), and the padded
# label is 255, which the loss ignores. A crop at ratio 0.5 is smaller than `crop_size` here:

# %%
small_cfg = get_config("upernet_small_demo", {"data.ratio_range": (0.5, 0.5)}).data
_ = torch.manual_seed(0)
x, y = T.train_transform(small_cfg)(*demo[4])
print("output:", tuple(x.shape), "| content 48x64 -> padded", tuple(y.shape))
print(f"normalized content: mean {x[:, :48].mean():.3f}, std {x[:, :48].std():.3f}")
print("pad rows: image all 0:", bool((x[:, 48:] == 0).all()), "| mask all 255:", bool((y[48:] == 255).all()))
show([(T.denormalize(x, small_cfg), y)], ["padded (bottom)"], DEMO_PALETTE, height=2.4)

# %% [markdown]
# ## 4. The test pipeline
#
# At test time the image is only resized to fit `base_scale` (aspect kept) and normalized. The
# mask is **not** resized: the logits are resized back to the label's original size instead, so
# mIoU is measured on the original annotation (docs/SPEC.md, "Test protocol").

# %%
image, mask = DemoScenes("val")[0]
x, y = T.test_transform(demo_cfg)(image, mask)
print("demo val:", tuple(image.shape[1:]), "-> image", tuple(x.shape[1:]), "| mask", tuple(y.shape))
for name in ("upernet_r50_os8_voc", "upernet_r50_os8_ade20k", "upernet_r50_os8_cityscapes"):
    base = get_config(name).data.base_scale
    size = {"voc": (375, 500), "ade20k": (512, 683), "cityscapes": (1024, 2048)}[name.split("_")[-1]]
    print(f"{name:<28} base_scale {base}: {size} -> {T.rescale_size(*size, base)}")
assert torch.equal(y, mask)


# %% [markdown]
# ## 5. Reproducible randomness in a DataLoader
#
# Every augmentation above draws from torch's global generator, so with `num_workers=0`
# `torch.manual_seed` alone reproduces the batches. With loader workers that is not enough:
# each worker has its own stream (base seed + worker id), so the crop an image gets would depend
# on which worker loaded it, hence on `data.num_workers` and on the number of processes. The
# trainer therefore fixes the data of a run from its seed alone (`upernet_ref.training.data_order`):
# `GlobalBatchOrder` decides which items form each global batch from (seed, iteration), and the
# DataLoader asks for `(index, position)` keys, where the position is the item's place in that
# endless stream; `SeededItems` loads item `index` after seeding torch, numpy and `random` from
# (seed, position), then restores the caller's random states. Whichever worker or process loads
# a key draws the same crop, flip and colours, on any hardware and after a resume (notebook 08
# shows the batch order). The DataLoader below is the trainer's (`trainer.micro_batches`, one
# process, `num_workers=0` as everywhere in the notebooks):

# %%
from upernet_ref.training.data_order import GlobalBatchOrder, MicroBatchSampler, SeededItems

scenes = DemoScenes("train", transform=T.train_transform(demo_cfg))


def first_batches(seed, count=2):
    order = GlobalBatchOrder(num_items=len(scenes), global_batch=8, seed=seed)
    sampler = MicroBatchSampler(order, rank=0, world_size=1, per_device_batch=8)
    loader = torch.utils.data.DataLoader(SeededItems(scenes, seed), batch_sampler=sampler, num_workers=0,
                                         generator=torch.Generator())
    batches = iter(loader)
    return [next(batches) for _ in range(count)], next(iter(sampler))


def same(a, b):
    return all(torch.equal(x, y) for batch_a, batch_b in zip(a, b) for x, y in zip(batch_a, batch_b))


(a, keys), (c, _) = first_batches(0), first_batches(1)
_ = torch.manual_seed(1234)  # the global generator's state does not matter
b, _ = first_batches(0)
index, position = keys[3]
image, mask = SeededItems(scenes, seed=0)[(index, position)]  # one key, loaded on its own
print("batch:", tuple(a[0][0].shape), a[0][0].dtype, tuple(a[0][1].shape), a[0][1].dtype,
      "| first keys (index, position):", keys[:3])
print("same seed, same batches (whatever the global generator):", same(a, b))
print(f"item {index} at position {position}, loaded alone == its place in the batch:",
      torch.equal(image, a[0][0][3]) and torch.equal(mask, a[0][1][3]))
print("other seed, other batches:", not same(a, c))
assert same(a, b) and not same(a, c) and torch.equal(image, a[0][0][3])

# %% [markdown]
# How fast is this on one CPU core, decoding included? `python benchmarks/data_pipeline.py`
# times the full training pipeline on ADE20K-sized JPEGs and Cityscapes-sized PNGs; divide a
# GPU's training throughput by its figure to know how many loader workers to give it.
#
# ## Summary
#
# - Every dataset yields `(uint8 (3, H, W), int64 (H, W))` with training labels and 255 = ignore;
#   the raw conventions (VOC palette indices, ADE20K reduce-zero-label, Cityscapes id -> train id)
#   are one look-up table each, and unknown values are errors.
# - The training pipeline is rescale -> `cat_max_ratio` crop -> flip -> photometric -> normalize
#   -> pad; geometry is applied jointly, masks use nearest neighbour, padding is 0 / 255.
# - The test pipeline only resizes and normalizes the image; the mask keeps its original size.
# - A run's data come from its seed alone: which items form each batch (`GlobalBatchOrder`) and
#   each item's random draws (`SeededItems`, by its stream position), with any number of
#   workers or processes, and after a resume.

# %% [markdown]
# ## Questionnaire
#
# 1. What does the value 255 mean in a mask, and where does it come from in VOC, ADE20K and
#    Cityscapes?
#    <!-- BEGIN ANSWER -->
#    *Ignore: VOC's object outlines, ADE20K's "other" (0, after reduce-zero-label), Cityscapes'
#    ids that are not evaluated; also the padding.*
#    <!-- END ANSWER -->
# 2. Why is the mask resized with nearest neighbour and the image bilinearly?
#    <!-- BEGIN ANSWER -->
#    *Interpolating labels would invent values between classes (a 7 between 6 and 8); nearest
#    keeps only existing labels.*
#    <!-- END ANSWER -->
# 3. What does `cat_max_ratio = 0.75` do, and why?
#    <!-- BEGIN ANSWER -->
#    *It redraws a crop (up to 10 times) while one class covers 75% or more of its labelled pixels,
#    so fewer crops are all sky or all road.*
#    <!-- END ANSWER -->
# 4. In which order are the training steps applied, and which touch the mask?
#    <!-- BEGIN ANSWER -->
#    *Rescale, crop, flip (image and mask), photometric, normalize (image only), pad (image 0,
#    mask 255).*
#    <!-- END ANSWER -->
# 5. Why does the test pipeline not resize the mask?
#    <!-- BEGIN ANSWER -->
#    *mIoU is measured on the original annotation: the logits are resized to it instead.*
#    <!-- END ANSWER -->
#
# ## Going further
#
# 1. Set `cat_max_ratio=1.0` in the demo config and train `upernet_small_demo` for 300 iterations
#    (`upernet train --config upernet_small_demo data.cat_max_ratio=1.0`). Which classes suffer?
# 2. Replace nearest with bilinear interpolation for the mask in `resize_pair`. Which label values
#    appear that were not in the input, and why is that a silent bug?
# 3. Train ADE20K without reduce-zero-label (`ADE20K(..., reduce_zero_label=False)`, 151 classes).
#    What does the network learn to predict for unlabelled pixels, and how does that change mIoU?
# 4. The reference pads centred, mmsegmentation bottom/right (docs/SPEC.md, "Training recipe"). Does it matter for a
#    fully convolutional network? Hint: think about what a padded pixel is after normalization.
