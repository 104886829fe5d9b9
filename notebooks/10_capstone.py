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
# # 10 · Capstone: your UPerNet, with trained weights
#
# Notebooks 01-03 had you write the pieces of the network; 07 and 09 the metric and the test
# protocol. Here they come together: **your** modules, assembled into a UPerNet whose
# `state_dict` has exactly the package's names and shapes, so that the course's trained
# `upernet_small_demo` checkpoint (notebook 08, section 6) loads into it with `strict=True`; then
# **your** inference and **your** mIoU over the whole demo val split must reach 75%.
#
# `upernet_small_demo` is the recipe's network at laptop size: a dilated ResNet-18 (two 3x3
# convolutions per block instead of the bottleneck: notebook 01, "Going further" 4) with one
# block per stage, base width 16 and a deep stem of width 16, output stride 8; a UPerNet head of
# width 32 with the PPM (1, 2, 3, 6) on C5; 8 classes. Its training-only auxiliary FCN head is
# the package's `FCNHead` (it is not used at test time, but its weights are in the checkpoint).
#
# Start from your own answers to the earlier exercises: each cell below asks for one module.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref import course
from upernet_ref.configs import get_config
from upernet_ref.data.transforms import colorize, test_transform
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.course import randomize_batchnorm
from upernet_ref.model import build_model
from upernet_ref.model.head import FCNHead
from upernet_ref.model.layers import ConvBNReLU, resize

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
cfg = get_config("upernet_small_demo")
m = cfg.model
print(f"ResNet-{m.depth}, blocks {m.blocks}, base width {m.base_width}, stem width {m.stem_width}, "
      f"output stride {m.output_stride}; head width {m.head_channels}, {m.num_classes} classes")

# %% [markdown]
# ## 1. The backbone (notebook 01)
#
# The ResNet-18 block: `conv1` (3x3, with the block's stride and dilation, padding = dilation),
# `bn1`, ReLU, `conv2` (3x3, stride 1, the same dilation), `bn2`; the shortcut `x`, or
# `downsample` (a strided 1x1 conv + BN) when the shape changes; ReLU after the addition. Then the
# backbone: the deep stem `stem` (three conv-BN-ReLU, 3 -> stem width (stride 2) -> stem width ->
# base width, as `nn.Sequential` of nine modules), a 3x3 max pool with stride 2, and four stages
# `layer1..4` of width base x 1, 2, 4, 8 with your strides and dilations (notebook 01, exercise
# 3) and contract dilation on the first block of a dilated stage. `forward` returns [C2, C3, C4, C5].

# %% tags=["raises-exception"]
class SketchBasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int):
        super().__init__()
        raise NotImplementedError("exercise: replace this line with your code")

    def forward(self, x):
        raise NotImplementedError("exercise: replace this line with your code")


class SketchResNet(nn.Module):
    def __init__(self, blocks=(1, 1, 1, 1), width: int = 16, stem_width: int = 16, output_stride: int = 8):
        super().__init__()
        raise NotImplementedError("exercise: replace this line with your code")

    def forward(self, x):
        raise NotImplementedError("exercise: replace this line with your code")


_ = SketchResNet()(torch.zeros(1, 3, 32, 32))  # a first try: it runs

# %% [markdown]
# ## 2. The head (notebooks 02 and 03)
#
# `SketchPPM`: `branches` (one `ConvBNReLU(cin, channels, 1)` per pool scale) and `bottleneck`
# (`ConvBNReLU(cin + scales x channels, channels, 3)`), with your forward pass of notebook 02.
# `SketchUPerHead`: `ppm` on C5, `lateral_convs` (1x1 on C2..C4), `fpn_convs` (3x3 on the three
# lower levels), `fuse`, `dropout` (`Dropout2d(0.1)`) and `classifier` (a 1x1 conv with bias),
# with your top-down pathway and your fusion of notebook 03. `ConvBNReLU` and `resize` are the
# package's building blocks.

# %% tags=["raises-exception"]
class SketchPPM(nn.Module):
    def __init__(self, cin: int, channels: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        raise NotImplementedError("exercise: replace this line with your code")

    def forward(self, x):
        raise NotImplementedError("exercise: replace this line with your code")


class SketchUPerHead(nn.Module):
    def __init__(self, in_channels, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        raise NotImplementedError("exercise: replace this line with your code")

    def forward(self, feats):
        raise NotImplementedError("exercise: replace this line with your code")


_ = SketchUPerHead((16, 32, 64, 128), 32, 8)([torch.zeros(2, 16, 8, 8), torch.zeros(2, 32, 4, 4),
                                              torch.zeros(2, 64, 4, 4), torch.zeros(2, 128, 4, 4)])

# %% [markdown]
# ## 3. The whole network
#
# `SketchUPerNet(cfg)`: `backbone`, `decode_head`, and `aux_head = FCNHead(C4's channels,
# aux width, classes)` (the package's); `forward(x)` returns `{"out": logits}` resized to the
# input (in training mode the package also returns `"aux"`; here we only test).

# %% tags=["raises-exception"]
class SketchUPerNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        raise NotImplementedError("exercise: replace this line with your code")

    def forward(self, x):
        raise NotImplementedError("exercise: replace this line with your code")


_ = SketchUPerNet(cfg)

# %% [markdown]
# The test: the course's trained weights load into your network with `strict=True` (every name
# and shape must match; `course.load_demo_checkpoint` checks the file's SHA-256 first), and your
# network computes what the package's does, on random weights with random BatchNorm statistics
# too.

# %%
def your_trained_upernet() -> nn.Module:
    # your network with the course's trained weights (load_state_dict is strict by default)
    return course.load_demo_checkpoint(SketchUPerNet(cfg)).to(device).eval()


# %% tags=["uses-exercise", "raises-exception"]
yours = your_trained_upernet()
package = course.load_demo_checkpoint(build_model(cfg)).to(device).eval()
x = torch.randn(2, 3, 96, 128, device=device)
with torch.no_grad():
    torch.testing.assert_close(yours(x)["out"], package(x)["out"])
    reference = randomize_batchnorm(build_model(cfg)).to(device).eval()
    random_weights = SketchUPerNet(cfg).to(device).eval()
    random_weights.load_state_dict(reference.state_dict())
    torch.testing.assert_close(random_weights(x)["out"], reference(x)["out"])
print(f"{len(yours.state_dict())} tensors loaded with strict=True; your UPerNet == the package's")

# %% [markdown]
# ## 4. Your inference and your mIoU
#
# The published protocol (notebook 09): the image fitted to the base scale by the test pipeline
# (`test_transform`, as the val set gives it), one forward pass on the whole image, the logits
# resized to the label's size, the argmax. The metric (notebook 07): one confusion matrix over the
# whole split (255 skipped), its per-class IoU (NaN for a class absent from truth and prediction),
# the mean over the classes that occur.

# %% tags=["raises-exception"]
def predict(model: nn.Module, image: torch.Tensor, label_size: tuple[int, int]) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


def split_miou(model: nn.Module, dataset, num_classes: int) -> tuple[float, torch.Tensor]:
    raise NotImplementedError("exercise: replace this line with your code")


_ = predict(build_model(cfg).to(device).eval(), torch.zeros(3, 32, 32), (32, 32))  # a first try: it runs

# %% tags=["uses-exercise", "raises-exception"]
val = DemoScenes("val", transform=test_transform(cfg.data))
yours = your_trained_upernet()
miou, iou = split_miou(yours, val, cfg.data.num_classes)
theirs = evaluate(package, val, cfg, device, progress=False, num_workers=0)
assert abs(miou - theirs["miou"]) < 1e-6, (miou, theirs["miou"])
assert miou >= 0.75, miou
print(f"{len(val)} val images: your mIoU == the package's evaluate, and >= 75%")

# %% [markdown]
# What your network predicts on three val scenes:

# %% tags=["uses-exercise", "raises-exception"]
yours = your_trained_upernet()
raw = DemoScenes("val")
fig, axes = plt.subplots(3, 3, figsize=(7.5, 6.3))
for row in range(3):
    image, mask = raw[row]
    x, _ = val[row]
    panels = (image, colorize(mask, DEMO_PALETTE), colorize(predict(yours, x, tuple(mask.shape)), DEMO_PALETTE))
    for ax, title, panel in zip(axes[row], ("image", "ground truth", "your prediction"), panels):
        ax.imshow(panel.permute(1, 2, 0).numpy())
        ax.set_axis_off()
        if row == 0:
            ax.set_title(title, fontsize=9)
plt.tight_layout()
course.class_legend(fig, DEMO_CLASSES, DEMO_PALETTE, ncol=5)
plt.show()

# %% [markdown]
# ## Summary
#
# - UPerNet is a dilated ResNet (C2..C5), a PPM on C5, laterals, a cumulative top-down pathway,
#   FPN convs, a fusion conv at 1/4 and a classifier; nothing else is needed to run the trained
#   weights.
# - Names and shapes are the contract between code and checkpoint: `strict=True` loading checks
#   every one of them.
# - The published protocol and metric, written by hand, give exactly `evaluate`'s mIoU.
#
# ## Questionnaire
#
# 1. Which tensors of the checkpoint does your network load but never use at test time?
# 2. Why does the head's input width list differ from the R-50 one of notebook 03?
# 3. What would `strict=False` hide if one of your module names were wrong?
