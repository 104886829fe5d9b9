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
# # 03 · FPN fusion: the UPerNet decode head
#
# UPerNet (Xiao et al. 2018, section 3.1 and figure 3) combines two ideas:
#
# - a **Feature Pyramid Network** (Lin et al., CVPR 2017): 1x1 *lateral* convolutions bring every
#   backbone level to the same width, a *top-down pathway* adds each coarser level, upsampled, to
#   the finer one below, and a 3x3 convolution smooths each merged level;
# - the **Pyramid Pooling Module** of PSPNet (notebook 02) on C5, whose output is the top of the
#   pyramid.
#
# The four levels are then upsampled to 1/4 of the input, concatenated and fused by a 3x3
# convolution (the paper's "fused feature map"), and a 1x1 classifier predicts the classes. All
# of that is **the paper's** network. Two additions are **the published recipe's**, not the
# paper's (docs/SPEC.md, "Paper vs published recipe"): a `Dropout2d(0.1)` before the classifier,
# and an FCN head on C4 that gives a second, auxiliary prediction during training only (PSPNet's
# deep supervision; the paper's authors use none for UPerNet). We build each piece, check the hand-built head against
# `upernet_ref.model.head.UPerHead`, and then look at the whole model: parameters of the 12 published
# configurations, GMACs, and outputs in train and eval mode.

# %%
# %matplotlib inline
import inspect

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref import course
from upernet_ref.configs import (REPORTED_PARAMS, REPORTED_PARAMS_NO_AUX_ADE20K, get_config,
                                 list_configs)
from upernet_ref.perf.flops import count_macs
from upernet_ref.perf.late_upsampling import conv_of_resized, late_upsampling
from upernet_ref.model.head import FCNHead, UPerHead, resize
from upernet_ref.course import randomize_batchnorm
from upernet_ref.model import build_model, count_parameters
from upernet_ref.model.ppm import ConvBNReLU, PyramidPooling

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
full_size = course.full_size(device)  # published widths on a GPU (or UPERNET_COURSE_FULL_SIZE=1)

# %% [markdown]
# ## 1. The four levels the head receives
#
# The dilated backbone (notebook 01) returns C2..C5. At output stride 8 only C2 has a finer
# resolution; C3, C4 and C5 all sit at 1/8. Shapes of the published R-50 at 512x512, on the
# `meta` device:

# %%
with torch.device("meta"):
    for os_ in (8, 16):
        net = build_model(f"upernet_r50_os{os_}_ade20k")
        feats = net.backbone(torch.zeros(2, 3, 512, 512))
        print(f"os {os_:2d}: " + ", ".join(f"C{i + 2} {tuple(f.shape[1:])}" for i, f in enumerate(feats)))

# %% [markdown]
# For the rest of the lesson we use small random features with the same geometry as a 64x64 input
# at output stride 8 (C2 at 16x16, C3..C5 at 8x8) and 1/8 of the channels, with a head width of 16
# instead of 512:

# %%
in_channels, channels, num_classes = (32, 64, 128, 256), 16, 5
feats = [torch.randn(2, c, s, s) for c, s in zip(in_channels, (16, 8, 8, 8))]
print([tuple(f.shape) for f in feats])

# %% [markdown]
# ## 2. Laterals
#
# C2, C3 and C4 each get a 1x1 conv + BN + ReLU to the head width (256/512/1024 -> 512 in the
# published model). C5 does not: the PPM plays its role and already outputs the head width.
#
# ### Exercise 1 (warm-up, checked): the pyramid's inputs
#
# Write `laterals(feats, head)`: from [C2, C3, C4, C5] to the four levels the top-down pathway
# starts from, with a `UPerHead`'s own layers (`head.lateral_convs`, `head.ppm`).
# `check_laterals` tries three heads with random BatchNorm statistics.

# %% tags=["raises-exception"]
def laterals(feats: list[torch.Tensor], head: UPerHead) -> list[torch.Tensor]:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_laterals(laterals)

# %%
lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1]).eval()
ppm = PyramidPooling(in_channels[-1], channels).eval()
with torch.no_grad():
    laterals = [conv(f) for conv, f in zip(lateral_convs, feats[:-1])] + [ppm(feats[-1])]
for i, (f, lat) in enumerate(zip(feats, laterals)):
    via = "PPM    " if i == 3 else "lateral"
    print(f"C{i + 2} {tuple(f.shape)} --{via}--> {tuple(lat.shape)}")


# %% [markdown]
# ## 3. The top-down pathway
#
# Going from the top level down, each level adds the level above, bilinearly resized to its own
# size: `laterals[i - 1] += resize(laterals[i])`. Coarse, semantically strong context thus flows
# into the finer levels.
#
# To *see* it, take a picture and give the four levels (at 1/4, 1/8, 1/16, 1/32 of the image, the
# stride-32 FPN geometry) only what their own scale adds: the top level the coarse 8x8 picture, every
# lower level the *detail* that its resolution adds over the next coarser one (a Laplacian pyramid).
# After the top-down pathway every level holds the whole picture at its scale: with identity laterals,
# FPN's top-down pathway is exactly the reconstruction of a Laplacian pyramid.

# %% [markdown]
# ### Exercise 2 (core, checked): write the pathway before you read it
#
# Write the top-down pathway: given the four laterals (finest first, the PPM output last), add to
# each level the upsampled sum coming from the level above, from the top down (use `resize`).
# `check_top_down` compares the four levels with the package's computation.

# %% tags=["raises-exception"]
def top_down_pathway(laterals: list[torch.Tensor]) -> list[torch.Tensor]:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_top_down(top_down_pathway)

# %%
def top_down(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    # FPN top-down pathway, finest level first
    merged = list(levels)
    for i in range(len(merged) - 1, 0, -1):
        merged[i - 1] = merged[i - 1] + resize(merged[i], merged[i - 1].shape[-2:])
    return merged


yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
picture = (0.8 * torch.exp(-((xx + 0.4) ** 2 + (yy + 0.3) ** 2) / 0.2)  # a coarse blob
           + 0.25 * torch.sin(9 * torch.sqrt((xx - 0.4) ** 2 + (yy - 0.3) ** 2))  # rings
           + 0.3 * torch.sign(torch.sin(25 * xx) * torch.sin(25 * yy)) * (xx < -0.1) * (yy > 0.35))  # checks
picture = picture[None, None]  # (1, 1, 256, 256)

gaussian = [F.avg_pool2d(picture, 4 * 2**k) for k in range(4)]  # 64x64, 32x32, 16x16, 8x8
bands = [g - resize(g_up, g.shape[-2:]) for g, g_up in zip(gaussian[:-1], gaussian[1:])] + [gaussian[-1]]
merged = top_down(bands)
for m, g in zip(merged, gaussian):
    torch.testing.assert_close(m, g)
print("top-down merge of the bands == the picture at every scale:",
      [tuple(m.shape[-2:]) for m in merged])

# %%
fig, axes = plt.subplots(2, 4, figsize=(12, 6.2))
for k in range(4):
    axes[0, k].imshow(bands[k][0, 0], cmap="gray")
    axes[0, k].set_title(f"level {k} (1/{4 * 2**k}) before")
    axes[1, k].imshow(merged[k][0, 0], cmap="gray")
    axes[1, k].set_title(f"level {k} after top-down")
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("FPN top-down pathway on a Laplacian pyramid: detail bands (top) -> full picture (bottom)")
plt.show()

# %% [markdown]
# In the dilated UPerNet at output stride 8, levels 1-3 share the 1/8 resolution, so two of the
# three top-down steps are plain additions: bilinear resizing to the same size (with
# `align_corners=False`) is the identity. Only C3 -> C2 upsamples by 2.

# %%
x = torch.randn(2, 16, 8, 8)
torch.testing.assert_close(resize(x, (8, 8)), x)
with torch.no_grad():
    merged_feats = top_down(laterals)
print("resize to the same size is the identity")
print("after top-down:", [tuple(m.shape) for m in merged_feats])

# %% [markdown]
# ## 4. FPN convolutions
#
# Each merged lower level goes through a 3x3 conv + BN + ReLU, which smooths the sum (and, in the
# original FPN, reduces the aliasing of the upsampling). The top level gets none: the PPM already
# ends with a 3x3 conv.

# %%
fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]).eval()
with torch.no_grad():
    outs = [conv(m) for conv, m in zip(fpn_convs, merged_feats[:-1])] + [merged_feats[-1]]
print("pyramid:", [tuple(o.shape) for o in outs])

# %% [markdown]
# ## 5. Fusion and classifier
#
# UPerNet's own step (section 3.1): all four levels are upsampled to the finest one (1/4 of the
# input) and concatenated (4 x 512 = 2048 channels), fused by a 3x3 conv + BN + ReLU to 512, and
# classified by `Dropout2d(0.1)` + a 1x1 conv **with** bias (the only biased conv of the head). The
# model finally upsamples the logits x4 to the input size.
#
# ### Exercise 3 (stretch, checked): fusion and classifier, before you read them
#
# Write `fuse_and_classify(outs, head)`: from the four pyramid levels (finest first) to the
# logits at 1/4, with the head's own layers `head.fuse`, `head.dropout` and `head.classifier`
# (use `resize`). `check_fuse_and_classify` compares it on four pyramids with a `UPerHead` whose
# BatchNorm statistics are random; `UPerHead.forward` is blocked while yours runs.

# %% tags=["raises-exception"]
def fuse_and_classify(outs: list[torch.Tensor], head: UPerHead) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_fuse_and_classify(fuse_and_classify)

# %%
fuse = ConvBNReLU(len(in_channels) * channels, channels, 3).eval()
dropout, classifier = nn.Dropout2d(0.1).eval(), nn.Conv2d(channels, num_classes, 1)
with torch.no_grad():
    size = outs[0].shape[-2:]
    cat = torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1)
    fused = fuse(cat)
    logits = classifier(dropout(fused))
    full = resize(logits, (64, 64))
print("concatenated", tuple(cat.shape), "-> fused", tuple(fused.shape), "-> logits", tuple(logits.shape))
print("logits at the input size", tuple(full.shape))

# %% [markdown]
# ## 6. The auxiliary FCN head
#
# In the published recipe (not in the paper), a second head on C4 adds a loss during training
# (weight 0.4, docs/SPEC.md, "Training recipe") that helps the deep backbone learn; it is dropped
# at test time. It is a plain FCN head:

# %%
print(inspect.getsource(FCNHead))
aux = FCNHead(in_channels[2], channels, num_classes).eval()
with torch.no_grad():
    print("C4", tuple(feats[2].shape), "-> aux logits", tuple(aux(feats[2]).shape))


# %% [markdown]
# ## 7. The whole head by hand, checked against the package
#
# Now the pieces in one module. The PPM and `ConvBNReLU` come from the package (notebook 02
# checked them); the FPN, the fusion and the classifier are ours. Submodule names follow
# `UPerHead`, so `load_state_dict` copies the weights. The reference's BatchNorm layers get random
# statistics first (fresh ones are the identity); we compare the pyramid levels and the logits, at
# the output-stride-8 geometry and at the stride-32 one (all four levels at different sizes).

# %%
class SketchUPerHead(nn.Module):
    def __init__(self, in_channels, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def pyramid(self, feats):
        levels = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [self.ppm(feats[-1])]
        levels = top_down(levels)
        return [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]

    def forward(self, feats):
        outs = self.pyramid(feats)
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


# the published head (C2..C5 of a 128x128 image) on a GPU; a narrow one on small maps on a CPU
if full_size:
    check_in, check_width, check_classes, scale = (256, 512, 1024, 2048), 512, 150, 2
else:
    check_in, check_width, check_classes, scale = in_channels, channels, num_classes, 1
reference = UPerHead(check_in, check_width, check_classes)
randomize_batchnorm(reference)
sketch = SketchUPerHead(check_in, check_width, check_classes)
sketch.load_state_dict(reference.state_dict())  # strict: same names, same shapes
reference, sketch = reference.to(device).eval(), sketch.to(device).eval()
for geometry, sizes in (("os  8", (16, 8, 8, 8)), ("os 32", (16, 8, 4, 2))):
    x = [torch.randn(1, c, s * scale, s * scale, device=device) for c, s in zip(check_in, sizes)]
    with torch.no_grad():
        for a, b in zip(sketch.pyramid(x), reference.fpn_features(x)):
            torch.testing.assert_close(a, b)
        ours, theirs = sketch(x), reference(x)
    torch.testing.assert_close(ours, theirs)
    assert ours.shape == (1, check_classes, *x[0].shape[-2:])
    print(f"{geometry}: pyramid and logits (classes at C2's size): sketch == UPerHead")

# %% [markdown]
# And the model is nothing more than backbone -> head -> resize to the input (plus the auxiliary
# head in training mode):

# %%
model = build_model("upernet_small_test")
randomize_batchnorm(model)
model = model.to(device).eval()
images = torch.randn(2, 3, 64, 64, device=device)
with torch.no_grad():
    by_hand = resize(model.decode_head(model.backbone(images)), images.shape[-2:])
    torch.testing.assert_close(model(images)["out"], by_hand)
print("UPerNet(x)['out'] == resize(decode_head(backbone(x))), shape", tuple(by_hand.shape))

# %% [markdown]
# ## 8. The whole model: parameters of the 12 published configurations
#
# Built on the `meta` device (no memory), counted, and compared with the reference counts of the
# model card (docs/SPEC.md, "Published figures"; BatchNorm, with the auxiliary head). Output stride changes no
# parameter, only the number of classes changes the two classifiers.

# %%
print(f"{'configuration':30s} {'params':>12s} {'reference':>12s}")
for name in list_configs(published_only=True):
    cfg = get_config(name)
    with torch.device("meta"):
        n = count_parameters(build_model(cfg))
    ref = REPORTED_PARAMS[cfg.model.depth][cfg.data.dataset]
    assert n == ref, (name, n, ref)
    print(f"{name:30s} {n:12,d} {ref:12,d}")
for depth in (50, 101):
    with torch.device("meta"):
        model = build_model(get_config(f"upernet_r{depth}_os8_ade20k", ["model.aux_head=false"]))
    n = count_parameters(model)
    assert n == REPORTED_PARAMS_NO_AUX_ADE20K[depth]
    print(f"{f'R-{depth} ADE20K without aux head':30s} {n:12,d} {REPORTED_PARAMS_NO_AUX_ADE20K[depth]:12,d}")

# %%
with torch.device("meta"):
    model = build_model("upernet_r50_os8_ade20k")
head = model.decode_head
parts = {
    "backbone (R-50 v1c)": model.backbone,
    "PPM": head.ppm,
    "laterals": head.lateral_convs,
    "FPN convs": head.fpn_convs,
    "fusion conv": head.fuse,
    "classifier": head.classifier,
    "aux head (train only)": model.aux_head,
}
total = count_parameters(model)
for name, m in parts.items():
    n = count_parameters(m)
    print(f"{name:24s} {n:12,d}  {100 * n / total:5.1f} %")
assert sum(count_parameters(m) for m in parts.values()) == total
print(f"{'total':24s} {total:12,d}")

# %% [markdown]
# ## The whole network, drawn from the model
#
# Every tensor shape of the published `upernet_r50_os8_ade20k` on one 512x512 image, recorded in
# one forward pass on the `meta` device (`course.output_shapes`: forward hooks, no compute). The
# orange boxes are the backbone (notebook 01), green the PPM (02), blue this notebook's FPN and
# fusion; the grey auxiliary head runs in training only. The top-down pathway is cumulative: each
# yellow sum adds its lateral and the upsampled *sum* of the level above (not its raw lateral).

# %%
with torch.device("meta"):
    published = build_model("upernet_r50_os8_ade20k")
    image = torch.zeros(1, 3, 512, 512)
stages = ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
heads = [f"decode_head.lateral_convs.{k}" for k in range(3)] + ["decode_head.ppm"]
smooth = [f"decode_head.fpn_convs.{k}" for k in range(3)]
shapes = course.output_shapes(published, image, stages + heads + smooth +
                              ["decode_head.fuse", "decode_head.classifier"])
aux_shape = course.output_shapes(published.aux_head, torch.zeros(shapes[stages[2]], device="meta"),
                                 ["classifier"])["classifier"]


def chw(shape):
    return "x".join(map(str, shape[1:]))


boxes = {"image": (0, -0.5, f"image\n{chw(image.shape)}"),
         "out": (12.6, 2, f"logits, upsampled\n{150}x512x512")}
arrows, colors = [], {}
for k in range(4):
    y = k
    boxes[f"C{k + 2}"] = (2, y, f"C{k + 2} (layer{k + 1})\n{chw(shapes[stages[k]])}")
    colors[f"C{k + 2}"] = "#f7e8d0"
    arrows.append(("image" if k == 0 else f"C{k + 1}", f"C{k + 2}"))
    name = "PPM" if k == 3 else "lateral 1x1"
    boxes[f"L{k}"] = (4.5, y, f"{name}\n{chw(shapes[heads[k]])}")
    colors[f"L{k}"] = "#d9f0d9" if k == 3 else "#e8eef7"
    arrows.append((f"C{k + 2}", f"L{k}"))
    if k < 3:  # the cumulative pathway: level k's sum = its lateral + the upsampled sum above
        boxes[f"P{k}"] = (6.3, y, f"+ upsampled sum above\n{chw(shapes[heads[k]])}")
        boxes[f"S{k}"] = (8.1, y, f"FPN 3x3\n{chw(shapes[smooth[k]])}")
        colors[f"P{k}"] = "#fff3c4"
        arrows += [(f"L{k}", f"P{k}"), (f"P{k + 1}" if k < 2 else f"L{k + 1}", f"P{k}"), (f"P{k}", f"S{k}")]
    arrows.append((f"S{k}" if k < 3 else f"L{k}", "fuse"))
boxes["fuse"] = (10.3, 1.5, f"upsample to 1/4, concat\n{4 * 512}x128x128\n3x3 fuse {chw(shapes['decode_head.fuse'])}")
boxes["cls"] = (10.3, 3, f"dropout, 1x1 classifier\n{chw(shapes['decode_head.classifier'])}")
boxes["aux"] = (4.5, -1, f"aux FCN head (training)\n{chw(aux_shape)}")
colors["aux"] = "#dddddd"
arrows += [("fuse", "cls"), ("cls", "out"), ("C4", "aux")]
fig, ax = plt.subplots(figsize=(14, 5))
course.draw_diagram(ax, boxes, arrows, colors)
ax.set_title("upernet_r50_os8_ade20k on a 512x512 image (C x H x W, batch 1)", fontsize=9)
plt.show()
assert shapes["decode_head.classifier"] == (1, 150, 128, 128) and shapes[stages[3]] == (1, 2048, 64, 64)

# %% [markdown]
# ## 9. Compute at 512x512
#
# `upernet_ref.perf.flops.count_macs` runs the model on the `meta` device under PyTorch's FLOP counter
# (convolutions only, as the published GMAC figures). In training mode the auxiliary head is
# counted too. The model card's figures (docs/SPEC.md, "Published figures") are printed beside ours.

# %%
published = {(50, 8): (398, 417), (50, 16): (263, 268), (101, 8): (None, 495), (101, 16): (None, 288)}
print(f"{'model, 512x512':16s} {'eval GMACs':>11s} {'train GMACs':>12s}   published (eval / train)")
for (depth, os_), (ref_eval, ref_train) in published.items():
    with torch.device("meta"):
        model = build_model(f"upernet_r{depth}_os{os_}_ade20k")
    g_eval = count_macs(model.eval(), (512, 512)) / 1e9
    g_train = count_macs(model.train(), (512, 512)) / 1e9
    assert ref_eval is None or round(g_eval) == ref_eval
    assert round(g_train) == ref_train
    print(f"{f'R-{depth} os {os_}':16s} {g_eval:11.1f} {g_train:12.1f}   {ref_eval or '-'} / {ref_train}")

# %% [markdown]
# Output stride 8 costs about 1.5x output stride 16: C4, C5, the PPM and the FPN's upper levels
# run at 4x the pixels.
#
# ### Where the fusion's MACs go, and the same numbers for less
#
# The fusion conv (2048 -> 512, 3x3, at 1/4 of the input) is the most expensive layer of the
# network, and three quarters of its input are P3-P5 upsampled: most of its work is spent on
# interpolated pixels. Two facts make that work avoidable. Bilinear resizing is *linear* and acts
# on each channel alone, so it commutes with any per-pixel channel mixing `W`:
# `W up(x) = up(W x)`. And a 3x3 conv is a sum over its 9 taps `t` of a 1x1 mixing `W_t` of the
# input shifted by `t`. Together: `conv(up(x)) = sum_t shift_t(up(W_t x))`, with the 9 mixings
# done at the *coarse* resolution. We rebuild that on small float64 tensors and check it against
# the plain conv and against `upernet_ref.perf.late_upsampling.conv_of_resized`, which the
# package's `--fast` path uses on the CPU for the fusion conv and the PPM bottleneck.

# %%
_ = torch.manual_seed(0)  # the same tensors whichever branch (CPU or full size) ran above
conv = nn.Conv2d(2 * 6, 5, 3, padding=1, bias=False).double()
fine = torch.randn(1, 6, 16, 16, dtype=torch.double)  # a level already at the output size
coarse = torch.randn(1, 6, 8, 8, dtype=torch.double)  # a level to be upsampled 2x
with torch.no_grad():
    as_written = conv(torch.cat([fine, resize(coarse, (16, 16))], dim=1))
    by_hand = F.conv2d(fine, conv.weight[:, :6], padding=1)
    for i in range(3):
        for j in range(3):
            w_t = conv.weight[:, 6:, i:i + 1, j:j + 1]  # tap t = (i, j) as a 1x1 mixing
            mixed = resize(F.conv2d(coarse, w_t), (16, 16))  # mixed at 8x8, then upsampled
            by_hand = by_hand + F.pad(mixed, (1, 1, 1, 1))[:, :, i:i + 16, j:j + 16]  # shifted
    package = conv_of_resized(conv, [fine, coarse], (16, 16))
same_by_hand = torch.allclose(by_hand, as_written, rtol=0, atol=1e-12)
same_package = torch.allclose(package, as_written, rtol=0, atol=1e-12)
print(f"equal to the conv of the concatenation to 1e-12 (float64): by hand {same_by_hand}, "
      f"package {same_package}")
assert same_by_hand and same_package

with torch.device("meta"):
    model = build_model("upernet_r50_os8_ade20k").eval()
fuse = model.decode_head.fuse.conv
fuse_gmacs = 128 * 128 * fuse.in_channels * fuse.out_channels * 9 / 1e9  # at 1/4 of 512x512
total = count_macs(model, (512, 512)) / 1e9
late = count_macs(late_upsampling(model), (512, 512)) / 1e9
print(f"fusion conv: {fuse_gmacs:.1f} of {total:.1f} GMACs ({fuse_gmacs / total:.0%}); "
      f"with late upsampling (fusion + PPM bottleneck) the network computes {late:.1f} GMACs")

# %% [markdown]
# The same function for about two thirds of the arithmetic. The published network is the one
# written above (and the package's `UPerHead` keeps it); the rewriting is an implementation
# choice of the fast path, checked against it (`tests/test_late_upsampling.py`).
#
# ## 10. Outputs in train and eval mode
#
# Like torchvision's segmentation models, `forward` returns a dict of logits at the input size:
# `"out"` always, `"aux"` only in training mode.

# %%
with torch.device("meta"):
    model = build_model("upernet_r50_os8_ade20k")
    x = torch.zeros(2, 3, 512, 512)
    for mode in ("train", "eval"):
        outputs = getattr(model, mode)()(x)
        print(f"{mode:5s}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items()))

# %% [markdown]
# The same on this machine with real numbers: the published R-50 os 8 ADE20K model at 128x128 on a
# GPU, the small demo model at 64x64 on a CPU. What we print holds for both.

# %%
name, size = ("upernet_r50_os8_ade20k", 128) if full_size else ("upernet_small_demo", 64)
model = build_model(name).to(device)
x = torch.randn(2, 3, size, size, device=device)
with torch.no_grad():
    for mode in ("train", "eval"):
        outputs = getattr(model, mode)()(x)
        ok = all(v.shape == (2, model.config.model.num_classes, size, size) for v in outputs.values())
        print(f"{mode:5s}: keys {sorted(outputs)}, every output (batch, classes, H, W) of the input: {ok}")

# %% [markdown]
# ## Summary
#
# - Laterals: 1x1 conv + BN + ReLU on C2, C3, C4 to the head width; the PPM output is the top level.
# - Top-down: `level[i - 1] += resize(level[i])`, from the top down; at output stride 8 two of the
#   three steps add maps of the same size. With identity laterals it reconstructs a Laplacian pyramid.
# - FPN convs: 3x3 conv + BN + ReLU on the three lower levels only.
# - Fusion: resize all four levels to 1/4, concatenate (4 x 512), 3x3 conv + BN + ReLU,
#   Dropout2d(0.1), 1x1 classifier with bias; logits resized to the input size.
# - Auxiliary FCN head on C4, training only: `{"out", "aux"}` in train mode, `{"out"}` in eval mode.
# - Parameters: 68,914,316 and 87,906,444 for ADE20K with the aux head, equal to the
#   reference for all 12 configurations; 398 / 263 GMACs (R-50, os 8 / os 16) at 512x512 in eval mode.
# - Our hand-built head equals `upernet_ref.model.head.UPerHead`.

# %% [markdown]
# ## Questionnaire
#
# 1. At which resolution does the fused feature map live, and how many channels does it have
#    before the fusion conv?
# 2. Why does the top-down pathway go from coarse to fine, and not the other way?
# 3. Which parts of this head come from the paper, and which from the published recipe?
# 4. Does output stride change the number of parameters? The MACs?
# 5. What does the model return in train mode that it does not return in eval mode?
#
# ## Going further
#
# 1. Remove the top-down pathway from `SketchUPerHead` (fuse the laterals directly). How many
#    parameters change? Train both on the demo data (notebook on training) and compare mIoU.
# 2. The original FPN (Lin et al.) uses nearest-neighbour upsampling in the top-down pathway.
#    Swap `resize` for `F.interpolate(..., mode="nearest")` in `top_down`: is the Laplacian
#    reconstruction still exact? (Hint: the bands must be built with the same upsampling.)
# 3. Count the MACs of the fusion conv alone at 512x512 and explain why it is the same for
#    output stride 8 and 16.
# 4. Where would you attach a head that predicts at 1/8 instead of 1/4? What would it save?
# 5. Build `upernet_r101_os8_cityscapes` on the meta device and compute its GMACs for a whole
#    1024x2048 image. Compare with the 2.1-3.9 TMACs of docs/SPEC.md, "Published figures".
# 6. The FPN conv of P2 also convolves an upsampled map: its input is `lateral + up(P3)`. Does
#    late upsampling save anything there? (Hint: a conv of a sum is the sum of the convs; count
#    the MACs of both ways at 512x512.)
