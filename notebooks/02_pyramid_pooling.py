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
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The Pyramid Pooling Module
#
# Even a dilated ResNet-50 "sees" much less of the image than its theoretical receptive field
# suggests (Zhou et al. 2015 measured the *empirical* receptive field to be far smaller). PSPNet
# (Zhao et al., CVPR 2017, section 3.2) adds a **global context prior**: the last feature map is
# average-pooled to 1x1, 2x2, 3x3 and 6x6 grids, each pooled map is projected by a 1x1 conv,
# upsampled back and concatenated with the feature map itself.
#
# UPerNet (Xiao et al. 2018, section 3.1 and figure 3) puts this Pyramid Pooling Module (PPM) on
# C5, the last backbone stage, and uses its output as the **top level of the FPN**. In the
# published models a 3x3 conv + BN + ReLU (the "bottleneck") fuses
# [C5, four branches] = 2048 + 4 x 512 = 4096 channels down to 512.
#
# We build it piece by piece: adaptive pooling, the branches, the upsampling, the concatenation
# and the bottleneck; then check our version against `upernet_ref.model.ppm.PyramidPooling` and count
# the full-size module.

# %%
# %matplotlib inline
import inspect
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from upernet_ref import course
from upernet_ref.model.head import resize
from upernet_ref.course import randomize_batchnorm
from upernet_ref.model import count_parameters
from upernet_ref.model.ppm import ConvBNReLU, PyramidPooling

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
full_size = course.full_size(device)  # published widths on a GPU (or UPERNET_COURSE_FULL_SIZE=1)


# %% [markdown]
# ## 1. A feature map to look at
#
# Pooling is easiest to see on a picture. We draw a small outdoor scene (sky, sun, ground, a house
# and a tree) with numpy and use its brightness as a one-channel "feature map". A 64x64 map is
# exactly the size of C5 for a 512x512 input at output stride 8.

# %%
def draw_scene(size: int = 64) -> np.ndarray:
    # A toy outdoor scene, float RGB in [0, 1], shape (size, size, 3).
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    img[:] = np.stack([0.45 + 0.3 * yy, 0.65 + 0.2 * yy, np.full_like(yy, 0.95)], -1)  # sky
    ground = yy > 0.62
    img[ground] = (0.35, 0.6, 0.25)
    img[(xx - 0.8) ** 2 + (yy - 0.18) ** 2 < 0.09**2] = (1.0, 0.9, 0.3)  # sun
    house = (xx > 0.12) & (xx < 0.45) & (yy > 0.42) & (yy < 0.75)
    img[house] = (0.75, 0.3, 0.25)
    roof = (yy > 0.25) & (yy <= 0.42) & (np.abs(xx - 0.285) < (yy - 0.25) * 1.1)
    img[roof] = (0.35, 0.2, 0.15)
    img[(xx > 0.25) & (xx < 0.32) & (yy > 0.6) & (yy < 0.75)] = (0.2, 0.12, 0.1)  # door
    img[(xx > 0.66) & (xx < 0.7) & (yy > 0.5) & (yy < 0.8)] = (0.4, 0.25, 0.1)  # trunk
    img[(xx - 0.68) ** 2 + (yy - 0.45) ** 2 < 0.12**2] = (0.1, 0.4, 0.15)  # crown
    return img


scene = draw_scene(64)
feature = torch.from_numpy(scene.mean(-1)).float()[None, None]  # (1, 1, 64, 64)
print("feature map", tuple(feature.shape), f"mean {feature.mean():.4f}")
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
axes[0].imshow(scene)
axes[0].set_title("the scene")
axes[1].imshow(feature[0, 0], cmap="gray")
axes[1].set_title("brightness = our feature map")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Adaptive average pooling to 1, 2, 3, 6 bins
#
# `F.adaptive_avg_pool2d(x, s)` averages the map over an s x s grid of bins, whatever the input
# size. The 1x1 bin is the global average (the "image-level feature" of ParseNet / PSPNet); the
# 6x6 one keeps a coarse layout: sky on top, ground below, the house on the left.

# %%
pool_scales = (1, 2, 3, 6)
pooled = {s: F.adaptive_avg_pool2d(feature, s) for s in pool_scales}
for s, p in pooled.items():
    print(f"scale {s}: {tuple(p.shape)}, mean {p.mean():.4f}")

fig, axes = plt.subplots(1, 5, figsize=(13, 2.9))
axes[0].imshow(feature[0, 0], cmap="gray", vmin=0, vmax=1)
axes[0].set_title("C5-sized map 64x64")
for ax, (s, p) in zip(axes[1:], pooled.items()):
    ax.imshow(p[0, 0], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"adaptive avg pool {s}x{s}")
for ax in axes:
    ax.axis("off")
plt.show()


# %% [markdown]
# The 1x1 and 2x2 maps keep the mean of the map exactly, the 3x3 and 6x6 ones do not: 64 pixels
# cannot be split into 3 or 6 equal bins. PyTorch's rule
# for bin *i* of *s* over *n* pixels is `[floor(i n / s), ceil((i + 1) n / s))`, so neighbouring
# bins **overlap** by one pixel when *s* does not divide *n*.
#
# ### Exercise 1 (warm-up, checked): the bins
#
# Write `bin_edges(n, s)`: the `(start, end)` of each of the *s* bins over *n* pixels, by that
# rule. `check_bin_edges` tries twenty sizes (more bins than pixels among them).

# %% tags=["raises-exception"]
def bin_edges(n: int, s: int) -> list[tuple[int, int]]:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_bin_edges(bin_edges)

# %% [markdown]
# With your bins, adaptive pooling by hand must equal PyTorch's:

# %% tags=["uses-exercise", "raises-exception"]
def adaptive_avg_pool_by_hand(x: torch.Tensor, s: int) -> torch.Tensor:
    rows, cols = bin_edges(x.shape[-2], s), bin_edges(x.shape[-1], s)
    return torch.stack([torch.stack([x[..., r0:r1, c0:c1].mean((-2, -1)) for c0, c1 in cols], -1)
                        for r0, r1 in rows], -2)


for s in (3, 6):
    print(f"64 pixels into {s} bins:", bin_edges(64, s))
x = torch.randn(2, 5, 64, 45)
for s in pool_scales:
    torch.testing.assert_close(adaptive_avg_pool_by_hand(x, s), F.adaptive_avg_pool2d(x, s))
print("hand-written adaptive pooling == F.adaptive_avg_pool2d for scales", pool_scales)

# %% [markdown]
# (This is also why exporting the PPM to ONNX can be awkward: with overlapping bins the adaptive
# pooling is not one fixed-size `AveragePool`.)
#
# ## 3. The branches: 1x1 conv + BN + ReLU
#
# Each pooled map goes through its own 1x1 convolution (2048 -> 512 in the real model), BatchNorm
# and ReLU. The package's building block is `ConvBNReLU`, the equivalent of mmsegmentation's
# `ConvModule`:

# %%
print(inspect.getsource(ConvBNReLU))

# %%
c5 = torch.randn(2, 64, 8, 8)  # a small C5: 64 channels instead of 2048
branches = nn.ModuleList(ConvBNReLU(64, 16, 1) for _ in pool_scales).eval()
for s, branch in zip(pool_scales, branches):
    with torch.no_grad():
        y = branch(F.adaptive_avg_pool2d(c5, s))
    print(f"scale {s}: pool {tuple(c5.shape)} -> {(2, 64, s, s)} -> branch -> {tuple(y.shape)}")

# %% [markdown]
# (In training mode the 1x1 branch's BatchNorm averages over the batch only, one value per image
# and channel: it needs a batch of at least 2, which is why the package's MAC counter uses
# `batch=2`.)
#
# ## 4. Upsampling back to the size of C5
#
# Every branch is bilinearly upsampled (`align_corners=False`, the convention throughout this
# model, `upernet_ref.model.head.resize`) to the size of C5, so the four context maps can be stacked on
# the feature map. Here is what the four branches hand on, shown on the scene's brightness (with
# the 1x1 conv left out):

# %%
upsampled = {s: resize(p, feature.shape[-2:]) for s, p in pooled.items()}
fig, axes = plt.subplots(1, 4, figsize=(11, 2.9))
for ax, (s, u) in zip(axes, upsampled.items()):
    ax.imshow(u[0, 0], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{s}x{s} -> 64x64 (bilinear)")
    ax.axis("off")
plt.show()
u = upsampled[1]
print("1x1 branch is constant over the map:", torch.allclose(u, u[..., :1, :1].expand_as(u)))

# %% [markdown]
# ## Exercise 2 (core, checked): the PPM's forward pass, before you read it
#
# You have seen every piece: the pooling, the branches, the upsampling. Before sections 5 and
# 6 show the answer, write the PPM's forward pass with the module's own layers (`ppm.pool_scales`,
# `ppm.branches`, `ppm.bottleneck`; `resize` is imported above). `check_ppm` compares it with
# `ppm(x)` on a small PPM with random BatchNorm statistics.

# %% tags=["raises-exception"]
def ppm_forward(x: torch.Tensor, ppm: PyramidPooling) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_ppm(ppm_forward)

# %% [markdown]
# ## 5. Concatenate and fuse: the bottleneck
#
# The feature map and the four upsampled branches are concatenated along channels, and a 3x3
# conv + BN + ReLU fuses them to `channels`: 2048 + 4 x 512 = 4096 -> 512 in the published model. The
# result has C5's spatial size and is the top of UPerNet's feature pyramid.

# %%
in_channels, channels = 64, 16
stack = [c5] + [resize(branch(F.adaptive_avg_pool2d(c5, s)), c5.shape[-2:])
                for s, branch in zip(pool_scales, branches)]
cat = torch.cat(stack, dim=1)
bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3).eval()
with torch.no_grad():
    top = bottleneck(cat)
print("concatenated", tuple(cat.shape), f"= {in_channels} + {len(pool_scales)} x {channels} channels")
print("bottleneck  ", tuple(top.shape))


# %% [markdown]
# ## 6. The whole PPM by hand, checked against the package
#
# Now the module in one piece. Its submodule names follow the package (`branches.K.conv`,
# `branches.K.bn`, `bottleneck.conv`, `bottleneck.bn`) so that `load_state_dict` copies the
# weights from `upernet_ref.model.ppm.PyramidPooling`. We give the reference's BatchNorm layers random
# statistics first (fresh ones are the identity), and compare on an odd-sized map too (13x17: the
# 3- and 6-bin poolings overlap).

# %%
class SketchPPM(nn.Module):
    def __init__(self, in_channels: int, channels: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = pool_scales
        self.branches = nn.ModuleList(ConvBNReLU(in_channels, channels, 1) for _ in pool_scales)
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x):
        context = [resize(branch(F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                   for s, branch in zip(self.pool_scales, self.branches)]
        return self.bottleneck(torch.cat([x, *context], dim=1))


# the published 2048 -> 512 PPM on C5 of a 128x128 image on a GPU; a 64 -> 16 one on a CPU
cin, cout, side = (2048, 512, 16) if full_size else (64, 16, 8)
reference = PyramidPooling(cin, cout, pool_scales)
randomize_batchnorm(reference)
sketch = SketchPPM(cin, cout, pool_scales)
sketch.load_state_dict(reference.state_dict())  # strict: same names, same shapes
reference, sketch = reference.to(device), sketch.to(device)
for mode in ("eval", "train"):
    for shape in ((2, cin, side, side), (2, cin, 13, 17)):
        x = torch.randn(shape, device=device)
        getattr(reference, mode)(), getattr(sketch, mode)()
        with torch.no_grad():
            ours = sketch(x)
            torch.testing.assert_close(ours, reference(x))
        assert ours.shape == (2, cout, *shape[2:])
        # printed without the sizes, which differ between the two branches
        print(f"{mode:5s} {'square C5' if shape[2] == shape[3] else '13x17 C5 '}: sketch == PyramidPooling "
              f"(output: C5's size, the head width)")

# %% [markdown]
# ## 7. The full-size PPM
#
# ### Exercise 3 (stretch, checked): the parameters, by formula
#
# Before counting them, write the number of parameters of `PyramidPooling(cin, channels,
# pool_scales)` as a formula: every branch is a bias-free 1x1 conv plus a BatchNorm (a weight
# and a bias per channel); the bottleneck a bias-free 3x3 conv on the concatenation plus its
# BatchNorm. `check_ppm_parameters` compares your formula with a count of the module's tensors.

# %% tags=["raises-exception"]
def ppm_parameters(cin: int, channels: int, pool_scales: tuple[int, ...]) -> int:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_ppm_parameters(ppm_parameters)

# %% [markdown]
# `PyramidPooling(2048, 512)` as published, on the `meta` device (no memory, no compute). Nearly
# all of its 23 M parameters sit in the 3x3 bottleneck (4096 x 512 x 9); and since that conv runs
# at C5's resolution, output stride 8 makes it 4x as expensive as output stride 16.

# %%
with torch.device("meta"):
    ppm = PyramidPooling(2048, 512, (1, 2, 3, 6))
parts = {f"branches.{k} (scale {s})": b for k, (s, b) in enumerate(zip(ppm.pool_scales, ppm.branches))}
parts["bottleneck"] = ppm.bottleneck
for name, m in parts.items():
    print(f"{name:24s} {count_parameters(m):12,d} params")
print(f"{'PyramidPooling(2048, 512)':24s} {count_parameters(ppm):12,d} params")
print()
for name, p in ppm.state_dict().items():
    if name.startswith(("branches.0.", "bottleneck.")) and not name.endswith("num_batches_tracked"):
        print(f"{name:28s} {tuple(p.shape)}")


# %%
def gmacs(module: nn.Module, x: torch.Tensor) -> float:
    # convolution multiply-accumulates of one forward pass, per image, in GMACs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


print(f"{'input (crop, os)':22s} {'C5':>20s} {'PPM output':>20s} {'GMACs':>8s}")
for crop, os_ in (((512, 512), 8), ((512, 512), 16), ((512, 1024), 8), ((512, 1024), 16)):
    c5 = torch.zeros(2, 2048, crop[0] // os_, crop[1] // os_, device="meta")
    out = ppm.eval()(c5)
    print(f"{f'{crop[0]}x{crop[1]}, os {os_}':22s} {str(tuple(c5.shape)):>20s} "
          f"{str(tuple(out.shape)):>20s} {gmacs(ppm, c5):8.1f}")

# %% [markdown]
# The picture of it, drawn from the module: `course.output_shapes` records every branch's output
# shape in one forward pass on the `meta` device (full size, no compute).

# %%
with torch.device("meta"):
    c5 = torch.zeros(1, 2048, 64, 64)  # C5 of a 512x512 image at output stride 8
shapes = course.output_shapes(ppm, c5, [f"branches.{k}" for k in range(4)] + ["bottleneck"])


def chw(shape):
    return "x".join(map(str, shape[1:]))


boxes = {"c5": (0, 1.5, f"C5\n{chw(c5.shape)}")}
arrows = [("c5", "cat"), ("cat", "out")]
for k, s in enumerate(ppm.pool_scales):
    boxes[f"pool{k}"] = (2, 3 - k, f"avg pool to {s}x{s}\n2048x{s}x{s}")
    boxes[f"branch{k}"] = (4, 3 - k, f"1x1 conv+BN+ReLU\n{chw(shapes[f'branches.{k}'])}")
    boxes[f"up{k}"] = (6, 3 - k, f"upsample\n512x{c5.shape[2]}x{c5.shape[3]}")
    arrows += [("c5", f"pool{k}"), (f"pool{k}", f"branch{k}"), (f"branch{k}", f"up{k}"), (f"up{k}", "cat")]
boxes["cat"] = (8, 1.5, f"concat with C5\n{2048 + 512 * len(ppm.pool_scales)}x64x64")
boxes["out"] = (10, 1.5, f"3x3 conv+BN+ReLU\n{chw(shapes['bottleneck'])}")
fig, ax = plt.subplots(figsize=(12, 3.6))
course.draw_diagram(ax, boxes, arrows, {"c5": "#f7e8d0", "out": "#d9f0d9"})
ax.set_title("The published PPM on C5 of a 512x512 image at output stride 8 (C x H x W)", fontsize=9)
plt.show()

# %% [markdown]
# ## 8. On this machine
#
# A real forward pass: the published 2048 -> 512 PPM on C5 of a 256x256 image at output stride 8
# on a GPU; a 256 -> 64 one on a 16x16 map on a CPU. What we print holds for both.

# %%
if full_size:
    ppm, c5 = PyramidPooling(2048, 512), torch.randn(2, 2048, 32, 32, device=device)
else:
    ppm, c5 = PyramidPooling(256, 64), torch.randn(2, 256, 16, 16, device=device)
ppm = ppm.to(device).eval()
with torch.no_grad():
    out = ppm(c5)
    global_branch = resize(ppm.branches[0](F.adaptive_avg_pool2d(c5, 1)), c5.shape[-2:])
print("output keeps C5's size:", out.shape[-2:] == c5.shape[-2:])
print("output channels == head width:", out.shape[1] == ppm.bottleneck.conv.out_channels)
print("global branch constant over the map:",
      torch.allclose(global_branch, global_branch[..., :1, :1].expand_as(global_branch)))
print("output is non-negative (ends with ReLU):", bool((out >= 0).all()))

# %% [markdown]
# ## Summary
#
# - The PPM pools C5 to 1x1, 2x2, 3x3 and 6x6 (adaptive bins, overlapping when the size is not a
#   multiple of the scale), projects each with a 1x1 conv + BN + ReLU, upsamples bilinearly
#   (`align_corners=False`) to C5's size, concatenates with C5 and fuses with a 3x3 conv + BN + ReLU.
# - Published size: 2048 -> 512, 4096 channels before the bottleneck, 23,073,792 parameters, of
#   which 18,875,392 in the bottleneck.
# - Its output, at C5's resolution, is the top level of UPerNet's FPN (notebook 03).
# - Our `SketchPPM` equals `upernet_ref.model.ppm.PyramidPooling` in eval and train mode.

# %% [markdown]
# ## Questionnaire
#
# 1. Which pooled sizes does the PPM use, and what does the 1x1 bin capture?
# 2. How many channels enter the bottleneck of the published PPM, and why?
# 3. Where are most of the PPM's parameters, and how does output stride change its cost?
# 4. What does `align_corners=False` mean for the upsampling, and what would the 1x1 branch look
#    like after it?
# 5. Does the PPM belong to the paper or to the published recipe?
#
# ## Going further
#
# 1. Remove the 1x1 branch (scales (2, 3, 6)). How many parameters does that save? What does the
#    network lose?
# 2. Find a C5 size for which every bin of every scale has the same number of pixels. Which
#    input crop sizes give it at output stride 8 and 16?
# 3. PSPNet (Zhao et al.) reduces each branch to 1/4 of the input channels (2048 -> 512) and
#    concatenates; UPerNet uses a fixed 512. Write the MAC count of the bottleneck as a function
#    of the C5 size and check it against `gmacs`.
# 4. Replace `F.adaptive_avg_pool2d` by `F.avg_pool2d` with a fixed kernel and stride for a 64x64
#    C5. Are the outputs equal for scales 1 and 2? For 3 and 6?
