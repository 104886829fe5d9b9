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
# # 01 · The dilated ResNet backbone
#
# UPerNet (Xiao et al. 2018, section 3 and figure 3) builds its feature pyramid on the four stage
# outputs C2, C3, C4, C5 of a ResNet (He et al. 2016). **In the paper** (and the authors' code)
# that ResNet is *not* dilated: C5 is at 1/32 of the input and the FPN recovers the resolution.
# **The published recipe** this project reproduces (the sssegmentation model card) changes the
# backbone: ResNet-50/101 **"v1c"** (a deep stem of three 3x3 convolutions) with **dilated**
# convolutions in the last stages, so that C5 stays at 1/8 (output stride 8) or 1/16 (output
# stride 16) of the input. This notebook teaches that dilated backbone; `output_stride=32` gives
# back the paper's. The whole course keeps the two apart:
#
# | | the paper (Xiao et al. 2018) / the authors' code | the published recipe (this project) |
# |---|---|---|
# | backbone | ResNet-50/101, not dilated (output stride 32), stem 64-64-128 | ResNet v1c, stem 32-32-64, dilated to output stride 8 or 16 |
# | head | PPM (1, 2, 3, 6) + FPN + fusion, width 512 | the same network |
# | dropout, auxiliary head | none, none | `Dropout2d(0.1)`; FCN head on C4, loss weight 0.4 (training only) |
# | loss | NLL at 1/4 resolution | cross-entropy at input resolution, ignore 255, + 0.4 x aux |
# | optimiser | SGD, lr 0.02, weight decay 1e-4 | SGD, lr 0.01, weight decay 5e-4 on every parameter |
# | schedule, batch | poly 0.9; 2 images x 8 GPUs | poly 0.9 to 1e-4, no warmup; global batch 16 (Cityscapes 8) |
# | augmentation | short side in {300..600}, flip | rescale x [0.5, 2], class-ratio crop 512, flip, photometric |
# | test | single scale or five sizes averaged | whole image at the base scale (the published table) |
#
# (A summary of `docs/SPEC.md`, "Paper vs published recipe", which gives the sources.)
#
# In this notebook we
#
# 1. look at one dilated 3x3 convolution,
# 2. see how dilation grows the receptive field without losing resolution,
# 3. read the bottleneck block and the two stems,
# 4. tabulate the strides and dilations for output stride 8 / 16 / 32 ("contract dilation"),
# 5. measure the feature-map sizes at 512x512,
# 6. rebuild a small dilated ResNet by hand and check that it equals `upernet_ref.model.backbone.ResNet`,
# 7. count the full-size backbones.

# %%
# %matplotlib inline
import inspect

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref import course
from upernet_ref.model.backbone import STRIDES_DILATIONS, Bottleneck, ResNet
from upernet_ref.course import randomize_batchnorm
from upernet_ref.model import count_parameters

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
full_size = course.full_size(device)  # published widths on a GPU (or UPERNET_COURSE_FULL_SIZE=1)

# %% [markdown]
# ## 1. A dilated 3x3 convolution
#
# A convolution with dilation *d* samples its 3x3 inputs *d* pixels apart: the same nine weights
# cover a (2d+1)x(2d+1) footprint ("atrous" convolution in DeepLab, Chen et al. 2017; "dilated"
# convolution in Yu & Koltun 2016). With `padding=d` the output keeps the input's size.

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for ax, d in zip(axes, (1, 2, 4)):
    grid = np.zeros((11, 11))
    for dy in (-d, 0, d):
        for dx in (-d, 0, d):
            grid[5 + dy, 5 + dx] = 1.0
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.2)
    ax.set_xticks(np.arange(-0.5, 11, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, 11, 1), minor=True)
    ax.grid(which="minor", color="0.8", linewidth=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(f"dilation {d}: 9 taps over {2 * d + 1}x{2 * d + 1}")
plt.show()

# %% [markdown]
# A dilated 3x3 convolution is an ordinary (2d+1)x(2d+1) convolution whose kernel has *d - 1*
# zeros between the taps. Let's check that with PyTorch:

# %%
d = 2
conv = nn.Conv2d(1, 1, 3, padding=d, dilation=d, bias=False)
x = torch.randn(1, 1, 12, 12)
sparse = torch.zeros(1, 1, 2 * d + 1, 2 * d + 1)
sparse[..., ::d, ::d] = conv.weight.detach()  # the 9 weights, d - 1 zeros apart
with torch.no_grad():
    y_dilated = conv(x)
    y_sparse = F.conv2d(x, sparse, padding=d)
torch.testing.assert_close(y_dilated, y_sparse)
print("input", tuple(x.shape), "-> output", tuple(y_dilated.shape))
print(f"dilated 3x3 == {2 * d + 1}x{2 * d + 1} kernel with zeros between the taps")


# %% [markdown]
# ### Exercise 1 (warm-up, checked): a convolution's output size
#
# Write the output length of a convolution from its input length, kernel, stride, padding and
# dilation (the formula behind every size in this notebook), then run the cell:
# `check_conv_output_size` compares your function with `nn.Conv2d` on twenty cases and names the
# usual mistakes.

# %% tags=["raises-exception"]
def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_conv_output_size(conv_output_size)

# %% [markdown]
# ## 2. Dilation grows the receptive field
#
# The *receptive field* of an output pixel is the set of input pixels that can change it. We can
# measure it: the gradient of one output pixel with respect to the input is non-zero exactly there.
# Three stacked 3x3 convolutions see 7x7 pixels; with dilations 1, 2, 4 they see 15x15
# (exponential growth, Yu & Koltun), with the same 27 weights and no loss of resolution.
# Dilations 2, 2, 2 show the price: a checkerboard of pixels that are never looked at
# ("gridding", Wang et al. 2018).

# %%
def gradient_footprint(dilations: tuple[int, ...], size: int = 33) -> torch.Tensor:
    # |d out[centre] / d input| through stacked 3x3 convs with all-ones weights
    layers = [nn.Conv2d(1, 1, 3, padding=d, dilation=d, bias=False) for d in dilations]
    for layer in layers:
        nn.init.ones_(layer.weight)
    x = torch.zeros(1, 1, size, size, requires_grad=True)
    y = nn.Sequential(*layers)(x)
    y[0, 0, size // 2, size // 2].backward()
    return x.grad[0, 0]


def extent(g: torch.Tensor) -> int:
    rows = torch.nonzero(g.abs().sum(1)).flatten()
    return int(rows.max() - rows.min() + 1)


stacks = [(1, 1, 1), (1, 2, 4), (2, 2, 2)]
footprints = {s: gradient_footprint(s) for s in stacks}
for s, g in footprints.items():
    print(f"dilations {s}: receptive field {extent(g)}x{extent(g)}, "
          f"pixels used {int((g != 0).sum())}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
for ax, (s, g) in zip(axes, footprints.items()):
    ax.imshow(g.numpy(), cmap="magma")
    ax.set_title(f"dilations {s}: {extent(g)}x{extent(g)}")
    ax.axis("off")
fig.suptitle("gradient of the centre output pixel w.r.t. the input")
plt.show()


# %% [markdown]
# The analytic rule, layer by layer: with *jump* j (the product of all strides so far),
#
# $$r_\text{out} = r_\text{in} + (k - 1)\, d\, j, \qquad j_\text{out} = j \cdot s.$$
#
# A stride multiplies the step of *every later layer*; a dilation only that of its own layer. So
# removing a stride of 2 and doubling the dilation of every later 3x3 convolution leaves the
# receptive field of every pixel unchanged, while the feature map keeps 2x the resolution. This is
# how DeepLab and PSPNet reuse ImageNet weights at output stride 8.
#
# We walk a ResNet's main path (the shortcut branches only see less) and apply the rule:

# %%
def receptive_field(model: nn.Module) -> list[tuple[str, int, int]]:
    # (module name, receptive field, jump) after each conv / pool on the main path
    rf, jump, rows = 1, 1, []
    for name, m in model.named_modules():
        if "downsample" in name or not isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            continue
        k, s, d = (v[0] if isinstance(v, tuple) else v for v in (m.kernel_size, m.stride, m.dilation))
        rf += (k - 1) * d * jump
        jump *= s
        rows.append((name, rf, jump))
    return rows


variants = {f"os {os_}": dict(output_stride=os_) for os_ in (32, 16, 8)}
variants["os 8, no contract"] = dict(output_stride=8, contract_dilation=False)
with torch.device("meta"):  # no memory, no compute: just the module tree
    nets = {k: ResNet(50, **v) for k, v in variants.items()}
rfs = {k: receptive_field(net) for k, net in nets.items()}

print(f"{'R-50':18s}" + "".join(f"{s:>14s}" for s in ("stem+pool", "layer1", "layer2", "layer3", "layer4")))
for k, rows in rfs.items():
    ends = {}
    for name, rf, jump in rows:
        ends["stem+pool" if not name.startswith("layer") else name.split(".")[0]] = (rf, jump)
    print(f"{k:18s}" + "".join(f"{f'{rf} px /{jump:>3d}':>14s}" for rf, jump in ends.values()))

# %% [markdown]
# (Each entry is *receptive field / jump*; the jump is the stride of that stage's output.) Output stride 8, 16 and 32 have **the same** receptive
# field at every stage: dilation exactly replaces the removed strides. Without contract dilation
# (every block of a dilated stage at the full dilation) the receptive field grows beyond that of
# the ImageNet network the weights were trained in.

# %%
assert rfs["os 8"][-1][1] == rfs["os 16"][-1][1] == rfs["os 32"][-1][1]
assert rfs["os 8, no contract"][-1][1] > rfs["os 8"][-1][1]
fig, ax = plt.subplots(figsize=(7, 3.8))
for (k, rows), style in zip(rfs.items(), ("-", "--", ":", "-.")):
    ax.plot([rf for _, rf, _ in rows], style, label=k, linewidth=2)
ax.set_xlabel("conv / pool on the main path (stem -> layer4)")
ax.set_ylabel("receptive field (pixels)")
ax.set_title("ResNet-50: theoretical receptive field")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. The bottleneck block
#
# ResNet-50/101 stack *bottleneck* blocks: 1x1 reduce -> 3x3 -> 1x1 expand (x4), plus a shortcut.
# The v1c / "pytorch style" block puts the stride (and the dilation) on the 3x3 convolution; the
# shortcut becomes a strided 1x1 conv + BN when the shape changes.
#
# ### Exercise 2 (core, checked): the dilated bottleneck
#
# Write the block before you read the package's: `conv1` (1x1, `cin -> planes`), `conv2` (3x3 with
# the block's stride and dilation, padding = dilation), `conv3` (1x1, `planes -> 4 x planes`), each
# conv bias-free and followed by its BatchNorm (`bn1`, `bn2`, `bn3`), ReLU after the first two;
# the shortcut is `x`, or `downsample` (a strided 1x1 conv + BN, as `nn.Sequential`) when the
# stride or the width changes; the last ReLU comes after the addition. The names must be the
# package's, so that its weights load: `check_bottleneck` loads a package `Bottleneck`'s
# state_dict into yours (random BatchNorm statistics) and compares the outputs on five blocks.

# %% tags=["raises-exception"]
class SketchBottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int):
        super().__init__()
        raise NotImplementedError("exercise: replace this line with your code")

    def forward(self, x):
        raise NotImplementedError("exercise: replace this line with your code")


course.check_bottleneck(SketchBottleneck)

# %% [markdown]
# The package's block, to compare with yours:

# %%
print(inspect.getsource(Bottleneck))

# %%
x = torch.randn(2, 256, 16, 16)
examples = {
    "identity (256 -> 64 -> 256)": Bottleneck(256, 64),
    "stride 2 (256 -> 128 -> 512)": Bottleneck(
        256, 128, stride=2,
        downsample=nn.Sequential(nn.Conv2d(256, 512, 1, 2, bias=False), nn.BatchNorm2d(512))),
    "dilation 2 (256 -> 64 -> 256)": Bottleneck(256, 64, dilation=2),
}
for name, block in examples.items():
    with torch.no_grad():
        y = block.eval()(x)
    print(f"{name:30s} {tuple(x.shape)} -> {tuple(y.shape)}, {count_parameters(block):,} params")

# %% [markdown]
# The dilated block keeps 16x16 and has exactly the parameters of the plain one: dilation is free
# in parameters, and costs compute only through the larger feature maps that follow.
#
# ## 4. Two stems: deep (v1c) and plain (7x7)
#
# The stem brings the image to 1/4 before `layer1`. The published models use the v1c *deep* stem:
# three 3x3 convolutions (3 -> 32 -> 32 -> 64, the first with stride 2), then a 3x3 max pool with
# stride 2. torchvision's ImageNet ResNets use one 7x7/2 convolution instead; the package keeps it
# as `stem="plain"` (same module names as torchvision) so those weights fit.

# %%
stems = {}
for stem in ("deep", "plain"):
    net = ResNet(50, stem=stem)
    stem_modules = [net.stem] if stem == "deep" else [net.conv1, net.bn1]
    stems[stem] = net
    n = sum(count_parameters(m) for m in stem_modules)
    rf = [r for name, r, _ in receptive_field(net) if name == "maxpool"][0]
    with torch.no_grad():
        c2 = net.eval()(torch.randn(1, 3, 64, 64))[0]
    print(f"{stem:5s} stem: {n:6,d} params, receptive field after the max pool {rf:2d} px, "
          f"C2 of a 64x64 image {tuple(c2.shape)}")
print(stems["deep"].stem)


# %% [markdown]
# The deep stem has 3x the parameters of the 7x7 one (still tiny next to the 23 M of the whole
# backbone) and sees a larger neighbourhood through three non-linearities.
#
# ## 5. Strides and dilations for output stride 8, 16, 32
#
# The rule: walk the four stages with their ImageNet strides (1, 2, 2, 2); once the output stride is
# reached, every further stride becomes a dilation instead.
#
# ### Exercise 3 (stretch, checked): the table, from the rule
#
# Derive the package's table from that rule: `strides_and_dilations(output_stride)` returns the
# four stages' strides and dilations (the stem leaves the image at 1/4). `check_strides_and_dilations`
# tries output strides 4, 8, 16 and 32; the package's table `STRIDES_DILATIONS` is emptied while
# your function runs.

# %% tags=["raises-exception"]
def strides_and_dilations(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_strides_and_dilations(strides_and_dilations)

# %% tags=["uses-exercise", "raises-exception"]
print(f"{'output stride':>14s}  {'stage strides':>14s}  {'stage dilations':>16s}")
for os_ in (8, 16, 32):
    assert strides_and_dilations(os_) == STRIDES_DILATIONS[os_]
    s, d = STRIDES_DILATIONS[os_]
    print(f"{os_:14d}  {str(s):>14s}  {str(d):>16s}")


# %% [markdown]
# **Contract dilation** (as in mmsegmentation / sssegmentation): the first block of a dilated stage
# uses half the stage's dilation. That first block is the one that had the stride in the ImageNet
# network, and its 3x3 convolution ran *before* the stride took effect, so its taps were one
# (old) pixel apart: dilation/2 reproduces exactly that geometry (section 2 above). Here are the
# dilations of every 3x3 conv of the real, read back from the built modules:

# %%
def block_dilations(net: ResNet) -> dict[str, list[int]]:
    return {f"layer{i}": [b.conv2.dilation[0] for b in getattr(net, f"layer{i}")] for i in (1, 2, 3, 4)}


with torch.device("meta"):
    for depth in (50, 101):
        for os_ in (8, 16):
            for contract in (True, False):
                net = ResNet(depth, output_stride=os_, contract_dilation=contract)
                dil = block_dilations(net)
                l3 = dil["layer3"]
                l3 = str(l3) if len(l3) < 7 else f"[{', '.join(map(str, l3[:3]))}, ... ({len(l3)} blocks)]"
                print(f"R-{depth:<3d} os {os_:2d} contract={contract!s:5s}  "
                      f"layer3 {l3}  layer4 {dil['layer4']}")

# %% [markdown]
# ## 6. Feature-map sizes at 512x512
#
# On the `meta` device a forward pass computes only shapes, so the full R-50 at 512x512 costs
# nothing. Output stride 8 keeps C3, C4, C5 all at 64x64, which is why the dilated network is both
# more accurate and much more expensive (C5 alone holds 2048 x 64 x 64 floats per image).

# %%
shapes = {}
with torch.device("meta"):
    for os_ in (8, 16, 32):
        net = ResNet(50, output_stride=os_)
        shapes[os_] = [tuple(f.shape) for f in net(torch.zeros(1, 3, 512, 512))]
print(f"{'R-50, 512x512':14s}" + "".join(f"{c:>22s}" for c in ("C2", "C3", "C4", "C5")))
for os_, s in shapes.items():
    print(f"{f'os {os_}':14s}" + "".join(f"{str(t):>22s}" for t in s))

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
xs = np.arange(4)
for i, (os_, s) in enumerate(shapes.items()):
    side = [t[-1] for t in s]
    mib = [t[1] * t[2] * t[3] * 4 / 2**20 for t in s]  # float32, one image
    axes[0].bar(xs + (i - 1) * 0.27, side, 0.27, label=f"os {os_}")
    axes[1].bar(xs + (i - 1) * 0.27, mib, 0.27, label=f"os {os_}")
for ax, title in zip(axes, ("feature-map side (pixels)", "activation size (MiB per image, fp32)")):
    ax.set_xticks(xs, ["C2", "C3", "C4", "C5"])
    ax.set_title(title)
    ax.legend()
plt.show()


# %% [markdown]
# ## 7. A small dilated ResNet by hand
#
# Now the whole backbone, written from the pieces above: your bottleneck (exercise 2), a stage that
# applies the stride and the (contracted) dilation to its first block, your table (exercise 3), and
# the deep stem. The module names
# follow the package (`stem.0`, `layer3.1.conv2`, `layer2.0.downsample.0`, ...) so that one
# `load_state_dict` copies the weights.

# %%
def sketch_stage(cin: int, planes: int, n: int, stride: int, dilation: int) -> nn.Sequential:
    first = dilation // 2 if dilation > 1 else 1  # contract dilation
    blocks = [SketchBottleneck(cin, planes, stride, first)]
    blocks += [SketchBottleneck(4 * planes, planes, 1, dilation) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class SketchResNet(nn.Module):
    def __init__(self, blocks=(1, 1, 2, 2), width: int = 8, stem_width: int = 8, output_stride: int = 8):
        super().__init__()
        def cbr(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.stem = nn.Sequential(*cbr(3, stem_width, 2), *cbr(stem_width, stem_width),
                                  *cbr(stem_width, width))
        strides, dilations = strides_and_dilations(output_stride)
        cin = width
        for i, (n, s, d) in enumerate(zip(blocks, strides, dilations)):
            self.add_module(f"layer{i + 1}", sketch_stage(cin, width * 2**i, n, s, d))
            cin = 4 * width * 2**i

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, 2, 1)  # (B, width, H/4, W/4)
        features = []
        for i in (1, 2, 3, 4):
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features  # [C2, C3, C4, C5]


# %% [markdown]
# To make the comparison meaningful, the package's BatchNorm layers get random statistics and
# affine parameters first (`upernet_ref.course.randomize_batchnorm`: fresh ones are the identity,
# so a mis-wired BN would go unnoticed), and both networks run in eval mode:

# %% tags=["uses-exercise", "raises-exception"]
# the published R-50 (at 128x128, to keep a CPU run of this branch short) on a GPU; a narrow,
# shallow one at 64x64 on a laptop CPU
blocks, width, stem, size = ((3, 4, 6, 3), 64, 32, 128) if full_size else ((1, 1, 2, 2), 8, 8, 64)
x = torch.randn(1, 3, size, size, device=device)
for os_ in (8, 16, 32):
    reference = ResNet(50, output_stride=os_, blocks=blocks, base_width=width, stem_width=stem)
    randomize_batchnorm(reference)
    sketch = SketchResNet(blocks, width=width, stem_width=stem, output_stride=os_)
    sketch.load_state_dict(reference.state_dict())  # strict: every name and shape must match
    reference, sketch = reference.to(device).eval(), sketch.to(device).eval()
    with torch.no_grad():
        ours, theirs = sketch(x), reference(x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    # what we print holds for both sizes: each level's stride and its channels / base width
    print(f"os {os_:2d}: sketch == upernet_ref.model.backbone.ResNet; C2..C5 at 1/"
          f"{[size // f.shape[-1] for f in ours]} of the input, {[f.shape[1] // width for f in ours]} x the width")

# %% [markdown]
# ## 8. The full-size backbones
#
# The real R-50 / R-101 (backbone only, no classifier), counted on the `meta` device. The plain-stem
# R-50 must have exactly torchvision's `resnet50` parameters minus its ImageNet classifier `fc`,
# with the same names.

# %%
import torchvision

with torch.device("meta"):
    tv = torchvision.models.resnet50()
    print(f"{'backbone':22s} {'params':>12s}")
    counts = {}
    for depth in (50, 101):
        for stem in ("deep", "plain"):
            counts[depth, stem] = count_parameters(ResNet(depth, stem=stem))
            print(f"{f'R-{depth} ({stem} stem)':22s} {counts[depth, stem]:12,d}")
    plain = ResNet(50, stem="plain")
tv_no_fc = count_parameters(tv) - count_parameters(tv.fc)
print(f"{'torchvision resnet50 - fc':22s} {tv_no_fc:12,d}")
assert counts[50, "plain"] == tv_no_fc
assert set(plain.state_dict()) == {k for k in tv.state_dict() if not k.startswith("fc.")}

# %%
with torch.device("meta"):
    for depth in (50, 101):
        for os_ in (8, 16):
            net = ResNet(depth, output_stride=os_)
            feats = net(torch.zeros(2, 3, 512, 512))
            print(f"R-{depth:<3d} os {os_:2d}: " + ", ".join(str(tuple(f.shape)) for f in feats))

# %% [markdown]
# ## 9. On this machine
#
# A real forward pass: the full R-50 at 256x256 on a GPU, a narrow one at 64x64 on a CPU. What we
# print does not depend on which: the stride of each stage relative to the input, and the
# channel multiple of the base width.

# %%
if full_size:
    net, size = ResNet(50, output_stride=8), 256
else:
    net, size = ResNet(50, output_stride=8, blocks=(1, 1, 1, 1), base_width=8, stem_width=8), 64
net = net.to(device).eval()
with torch.no_grad():
    feats = net(torch.randn(1, 3, size, size, device=device))
base = net.out_channels[0] // 4
print("stride of C2..C5:   ", tuple(size // f.shape[-1] for f in feats))
print("channels / base width:", tuple(f.shape[1] // base for f in feats))
assert all(torch.isfinite(f).all() for f in feats)

# %% [markdown]
# ## Summary
#
# - A dilated 3x3 convolution has 9 weights spread over (2d+1)x(2d+1) pixels; with padding *d* it
#   keeps the resolution.
# - Replacing a stride-2 by doubled dilations in all later 3x3 convs keeps every receptive field
#   of the ImageNet network ($r \mathrel{+}= (k-1)\,d\,j$), provided the first block of the stage
#   uses half the dilation (*contract dilation*).
# - Output stride 8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4); output stride 16: strides
#   (1, 2, 2, 1), dilations (1, 1, 1, 2). C2..C5 have 256, 512, 1024, 2048 channels.
# - At 512x512, os 8 gives C3 = C4 = C5 = 64x64; os 16 gives 64, 32, 32; os 32 gives 64, 32, 16.
# - Our hand-built backbone equals `upernet_ref.model.backbone.ResNet` for all three output strides.

# %% [markdown]
# ## Questionnaire
#
# 1. Which output stride does the paper's UPerNet use, and which do the published models use?
# 2. How many weights does a 3x3 convolution with dilation 4 have, and how wide is its footprint?
# 3. Why does the first block of a dilated stage use half the dilation ("contract dilation")?
# 4. At 512x512 and output stride 8, what is the spatial size of C5? At output stride 32?
# 5. What differs between the v1c stem and the plain 7x7 stem?
#
# ## Going further
#
# 1. Use `receptive_field` to find the theoretical receptive field of C4 in R-101. Is it larger
#    than a 512x512 crop? What does the *effective* receptive field (the gradient footprint of
#    section 2, on a trained network) look like instead?
# 2. Set `contract_dilation=False` in `sketch_stage` and in the reference and check that they
#    still agree. By how many pixels does the receptive field of C5 grow?
# 3. Compute the extra MACs of os 8 over os 32 for `layer4` alone: a 3x3 conv's cost scales with
#    the number of output pixels.
# 4. Write the ResNet-18 (BasicBlock) version of `SketchBottleneck` and compare it with
#    `ResNet(18, ...)`.
# 5. Find the smallest input size for which R-50 at os 32 still gives a C5 of at least 2x2.
