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
# # 09 · Inference: whole image, sliding window, multi-scale + flip
#
# The published table (docs/SPEC.md, "The 12 published results" and "Test protocol") uses the
# simplest test protocol: resize the image
# to fit the base scale (2048x512 for ADE20K and VOC, aspect kept), run the network **once on the
# whole image**, resize the logits back to the label's size, take the argmax. Two other protocols
# are common and give different numbers (a frequent question in the peers' issue trackers):
#
# - **sliding window**: crops of the training size (512x512) every `stride` pixels (341), the
#   logits of overlapping crops averaged; the network then always sees inputs of the size it was
#   trained on, at the price of several forward passes;
# - **multi-scale + flip** (test-time augmentation, TTA): the image at scales 0.5 ... 1.75 and
#   mirrored, twelve views whose softmax probabilities are averaged.
#
# Here we rebuild the sliding window and multi-scale + flip by hand and check them against
# `upernet_ref.evaluation.inference`, run all four protocols on the same image with the course's
# trained `upernet_small_demo` (the checkpoint notebook 08 loads), and compare what they cost
# (time, forward passes, multiply-accumulates) with what they change.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle
from torch.utils.flop_counter import FlopCounterMode

from upernet_ref import course
from upernet_ref import build_model, get_config
from upernet_ref.evaluation import inference
from upernet_ref.configs import override
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.model.layers import resize
from upernet_ref.perf.bench import time_calls
from upernet_ref.perf.flops import count_macs, num_forward_passes
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes
from upernet_ref.data.transforms import colorize, denormalize, test_transform

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
cfg = get_config("upernet_small_demo")
print(cfg.test)

# %% [markdown]
# ## 1. A trained model
#
# `upernet_small_demo` is the full architecture (dilated ResNet, PPM, FPN fusion, auxiliary head)
# shrunk to run on a laptop. `course.load_demo_checkpoint` loads the course's trained weights
# (900 iterations of the recipe, `notebooks/assets/make_demo_checkpoint.py`), after checking the
# file's SHA-256. With the published protocol (whole image, single scale) on the whole demo val
# split:

# %%
model = course.load_demo_checkpoint(build_model(cfg)).to(device).eval()
val = DemoScenes("val", transform=test_transform(cfg.data))
published_protocol = evaluate(model, val, cfg, device, progress=False, num_workers=0)
assert published_protocol["miou"] >= 0.75, published_protocol["miou"]
print(f"{published_protocol['num_images']} val images, {published_protocol['protocol']}: mIoU >= 75%")

# %%
# NBVAL_IGNORE_OUTPUT
# (the last digit may differ with the machine's float arithmetic)
print(f"mIoU {100 * published_protocol['miou']:.1f}%")

# %% [markdown]
# ## 2. The test input
#
# `test_transform` fits the image into the base scale (for the demo config 128x96, so the
# 96x128 demo images keep their size) and normalises it; the label stays at its original size,
# which is where the prediction is compared.

# %%
image, mask = val[4]
print("normalised image", tuple(image.shape), image.dtype, "| label", tuple(mask.shape), mask.dtype)

# %% [markdown]
# ## 3. Sliding windows
#
# `window_grid` lays crops of `crop_size` every `stride` pixels; the last row and column are
# shifted back inside the image (as mmsegmentation does), so every window is a full crop and every
# pixel is covered. The count map says how many windows saw each pixel: their logits are summed
# and divided by it.

# %%
h, w = image.shape[-2:]
windows = inference.window_grid((h, w), cfg.test.crop_size, cfg.test.stride)
print(f"crop {cfg.test.crop_size}, stride {cfg.test.stride} on {(h, w)}: {len(windows)} windows")
for win in windows:
    print("  (y1, y2, x1, x2) =", win)
count = torch.zeros(h, w)
for y1, y2, x1, x2 in windows:
    count[y1:y2, x1:x2] += 1

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
axes[0].imshow(denormalize(image, cfg.data).permute(1, 2, 0))
for (y1, y2, x1, x2), color in zip(windows, plt.cm.tab10.colors):
    axes[0].add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=2, ec=color))
axes[0].set_title("windows")
im = axes[1].imshow(count, cmap="magma")
fig.colorbar(im, ax=axes[1])
axes[1].set_title("count map (windows per pixel)")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ### Exercise 1 (core, checked): the sliding window, before the reveal
#
# Write `slide_inference(model, image, crop_size, stride)`: windows every `stride`, the last of
# each row and column shifted back inside the image; an image smaller than the crop is padded
# (bottom and right, zeros) to the crop and the padding cut off the logits; each window's logits
# added at its place; the sum divided, pixel by pixel, by how many windows saw it. The model
# returns `{"out": logits}`. `check_slide_inference` tries five images (one smaller than the crop).

# %%
def slide_inference(model: torch.nn.Module, image: torch.Tensor, crop_size: tuple[int, int],
                    stride: tuple[int, int]) -> torch.Tensor:
    ### BEGIN SOLUTION
    (h, w), (ch, cw), (sh, sw) = image.shape[-2:], crop_size, stride
    tops = sorted({min(y, max(h - ch, 0)) for y in range(0, max(h - ch, 0) + sh, sh)})
    lefts = sorted({min(x, max(w - cw, 0)) for x in range(0, max(w - cw, 0) + sw, sw)})
    total, seen = 0, torch.zeros(1, 1, h, w)
    for y in tops:
        for x in lefts:
            window = image[..., y:y + ch, x:x + cw]
            wh, ww = window.shape[-2:]
            logits = model(F.pad(window, (0, cw - ww, 0, ch - wh)))["out"][..., :wh, :ww]
            total = total + F.pad(logits, (x, w - x - ww, y, h - y - wh))  # at the window's place
            seen[..., y:y + wh, x:x + ww] += 1
    return total / seen
    ### END SOLUTION


course.check_slide_inference(slide_inference)

# %% [markdown]
# ### Sliding windows by hand
#
# Run the network on every window, add its logits into a sum at the window's place, divide by the
# count map, then softmax at the label size. It must equal `inference` with the protocol
# `test.mode=slide` (`upernet eval --test.mode=slide`), written here as an override of `cfg`:

# %%
def slide_by_hand(model, image, crop_size, stride):
    h, w = image.shape[-2:]
    logits_sum = torch.zeros(1, cfg.data.num_classes, h, w, device=image.device)
    seen = torch.zeros(1, 1, h, w, device=image.device)
    for y1, y2, x1, x2 in inference.window_grid((h, w), crop_size, stride):
        logits_sum[..., y1:y2, x1:x2] += model(image[None, :, y1:y2, x1:x2])["out"]
        seen[..., y1:y2, x1:x2] += 1
    return logits_sum / seen


with torch.no_grad():
    ours = slide_by_hand(model, image.to(device), cfg.test.crop_size, cfg.test.stride)
    ours = resize(ours, tuple(mask.shape)).softmax(1) if ours.shape[-2:] != mask.shape else ours.softmax(1)
slide = override(cfg, {"test.mode": "slide"}).test
theirs = inference.inference(model, image, slide, tuple(mask.shape))
torch.testing.assert_close(ours, theirs)
print(f"{len(windows)} windows: by hand == inference with test.mode=slide")

# %% [markdown]
# ### Exercise 2 (warm-up, checked): flip, before the reveal
#
# Write flip test-time augmentation at a single scale: the softmax of the image's logits and of
# its mirror's logits (flipped back), averaged. The model returns `{"out": logits}`.
# `check_flip_inference` compares it with `inference.inference` with `test.flip=true`.

# %%
def flip_inference(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    probs = model(image)["out"].softmax(1)
    mirrored = model(image.flip(-1))["out"].flip(-1).softmax(1)
    return (probs + mirrored) / 2
    ### END SOLUTION


course.check_flip_inference(flip_inference)

# %% [markdown]
# ### Exercise 3 (stretch, checked): multi-scale + flip
#
# Now every scale: `multiscale_flip(model, image, scales, out_size)` resizes the (1, 3, h, w)
# image to each scale (the size rounded as `int(x + 0.5)`), runs it and its mirror (the mirror's
# logits flipped back), resizes each view's logits to `out_size`, takes the softmax, and averages
# the probabilities of all views. `check_multiscale_flip` tries four images and scale sets.

# %%
def multiscale_flip(model: torch.nn.Module, image: torch.Tensor, scales: tuple[float, ...],
                    out_size: tuple[int, int]) -> torch.Tensor:
    ### BEGIN SOLUTION
    h, w = image.shape[-2:]
    views = []
    for s in scales:
        scaled = resize(image, (int(h * s + 0.5), int(w * s + 0.5)))
        for mirrored in (False, True):
            logits = model(scaled.flip(-1) if mirrored else scaled)["out"]
            views.append(resize(logits.flip(-1) if mirrored else logits, out_size).softmax(1))
    return torch.stack(views).mean(0)
    ### END SOLUTION


course.check_multiscale_flip(multiscale_flip)

# %% [markdown]
# ### Multi-scale + flip by hand
#
# For every scale: resize the image (rounding as mmsegmentation, `int(x + 0.5)`), run it and its
# mirror, flip the mirror's logits back, resize each to the label size, softmax, and average the
# probabilities of all views:

# %%
def multiscale_flip_by_hand(model, image, scales, out_size):
    h, w = image.shape[-2:]
    probs = []
    for s in scales:
        scaled = resize(image[None], (int(h * s + 0.5), int(w * s + 0.5)))
        for mirrored in (False, True):
            x = scaled.flip(-1) if mirrored else scaled
            logits = model(x)["out"]
            logits = logits.flip(-1) if mirrored else logits
            probs.append(resize(logits, out_size).softmax(1))
    return torch.stack(probs).mean(0)


TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
with torch.no_grad():
    ours = multiscale_flip_by_hand(model, image.to(device), TTA_SCALES, tuple(mask.shape))
tta = override(cfg, {"test.scales": TTA_SCALES, "test.flip": True}).test
theirs = inference.inference(model, image, tta, tuple(mask.shape))
torch.testing.assert_close(ours, theirs)
print(f"{2 * len(TTA_SCALES)} views: by hand == inference with test.scales=... and test.flip=true")

# %% [markdown]
# ## 4. Four protocols on one image
#
# `inference.inference(model, image, test, out_size)` returns class probabilities at `out_size`,
# with every option from `test`, a `TestConfig` (`cfg.test`, or another protocol written as
# overrides of it, as `upernet eval --test.mode=slide --test.flip=true` does). It runs the views one at a time and adds each view's softmax
# into one accumulator at the output size, so twelve views need the memory of one forward at the
# largest scale plus that accumulator. It averages **softmax probabilities, not logits**: logit
# magnitudes differ between scales, and probabilities give each view one normalised vote (as
# mmsegmentation's `aug_test`).
#
# We count forward passes with a hook and multiply-accumulates with torch's `FlopCounterMode`,
# and time each protocol with `perf.bench.time_calls` (one run after the counted one, which
# warms up; it synchronises the GPU before reading the clock, since CUDA kernels run
# asynchronously).

# %%
protocols = {  # as overrides of the configuration: the command line's --test.* options
    "whole": {"test.mode": "whole"},
    "slide": {"test.mode": "slide"},
    "whole + ms + flip": {"test.mode": "whole", "test.scales": TTA_SCALES, "test.flip": True},
    "slide + ms + flip": {"test.mode": "slide", "test.scales": TTA_SCALES, "test.flip": True},
}
calls = []
hook = model.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape[-2:])))
results = {}
for name, changes in protocols.items():
    test = override(cfg, changes).test
    calls.clear()
    with FlopCounterMode(display=False) as flops:
        probs = inference.inference(model, image.to(device), test, tuple(mask.shape))
    forwards, sizes = len(calls), sorted(set(calls))
    seconds = time_calls(lambda: inference.inference(model, image.to(device), test, tuple(mask.shape)),
                         device, warmup=0, repeats=1)["median_s"]
    pred = probs.argmax(1)[0].cpu()
    valid = mask != 255
    results[name] = dict(pred=pred, forwards=forwards, macs=flops.get_total_flops() // 2,
                         seconds=seconds, acc=float((pred == mask)[valid].float().mean()),
                         sizes=sizes)
hook.remove()
print(f"{'protocol':<20}{'forwards':>9}{'MMACs':>9}   input sizes")
for name, r in results.items():
    print(f"{name:<20}{r['forwards']:>9}{r['macs'] / 1e6:>9.1f}   {r['sizes']}")
for name, changes in protocols.items():
    expected = num_forward_passes((h, w), override(cfg, changes).test)
    assert results[name]["forwards"] == expected, name

# %%
# NBVAL_IGNORE_OUTPUT
# (times vary; the accuracies may differ in the last digit between machines)
for name, r in results.items():
    print(f"{name:<20} {1000 * r['seconds']:8.1f} ms per image   pixel accuracy {r['acc']:.3f}")
assert results["slide + ms + flip"]["seconds"] > results["whole"]["seconds"]

# %%
fig, axes = plt.subplots(1, 6, figsize=(18, 2.8))
raw = denormalize(image, cfg.data).permute(1, 2, 0)
panels = [(raw, "image"), (colorize(mask, DEMO_PALETTE).permute(1, 2, 0), "ground truth")]
panels += [(colorize(r["pred"], DEMO_PALETTE).permute(1, 2, 0), f"{name}\n{r['forwards']} fwd, acc {r['acc']:.3f}")
           for name, r in results.items()]
for ax, (img, title) in zip(axes, panels):
    ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
course.class_legend(fig, DEMO_CLASSES, DEMO_PALETTE)
plt.show()

# %% [markdown]
# The protocols agree on most pixels; they disagree near boundaries and on the small shapes,
# where the extra views (especially the larger scales, which see the shapes bigger) change the
# vote.

# %%
# NBVAL_IGNORE_OUTPUT
# (may differ in the last digit between machines)
base = results["whole"]["pred"]
for name, r in results.items():
    print(f"{name:<20} differs from 'whole' on {(r['pred'] != base).float().mean():.1%} of pixels")

# %% [markdown]
# ## 5. Sanity checks
#
# - When one window covers the image (crop = image size), sliding-window inference *is*
#   whole-image inference.
# - The result is a probability distribution at the label's size, whatever the views.

# %%
one_window = override(cfg, {"test.mode": "slide", "test.crop_size": (h, w), "test.stride": (h, w)}).test
torch.testing.assert_close(inference.inference(model, image, one_window),
                           inference.inference(model, image, override(cfg, {"test.mode": "whole"}).test))
two_scales = override(cfg, {"test.scales": (0.5, 1.5), "test.flip": True}).test
probs = inference.inference(model, image, two_scales, out_size=(150, 200))
print(tuple(probs.shape))
torch.testing.assert_close(probs.sum(1).cpu(), torch.ones(1, 150, 200))

# %% [markdown]
# ## 6. Over a validation set, and at the published size
#
# `evaluate.evaluate` runs `inference` with `cfg.test` on every image of a split and accumulates
# one confusion matrix (notebook 07); its dataset gives the items as `test_transform(cfg.data)`
# makes them, as `val` does. Another protocol is another configuration. On the first 20
# validation scenes, with the trained model:

# %%
val_small = torch.utils.data.Subset(val, range(20))
split_miou = {}
for name in ("whole", "slide", "whole + ms + flip"):
    r = evaluate(model, val_small, override(cfg, protocols[name]), device, progress=False, num_workers=0)
    split_miou[name] = r["miou"]
    assert r["aacc"] > 0.8  # far better than always answering "sky" (0.39, notebook 07)
print("protocol:", r["protocol"])

# %%
# NBVAL_IGNORE_OUTPUT
# (the last digit may differ between machines)
for name, miou in split_miou.items():
    print(f"{name:<20} mIoU {100 * miou:.1f}%   ({100 * (miou - split_miou['whole']):+.1f} points vs whole)")

# %% [markdown]
# On these scenes, with this model, multi-scale + flip gains one to two points of mIoU (it sees the
# small shapes larger), at 17x the multiply-accumulates of one pass (section 4; the time ratio
# there depends on the machine and its load: about 13x on an idle 2-core CPU, where the larger
# views keep the cores busier than the small one, and far more on a busy machine such as the one
# that executed the copy committed here). The sliding window does not help here, it loses about
# a point: a 96x128 scene is barely larger than the 64x64 training crop, so whole-image
# inference already sees what the network was trained on, and the windows cut shapes at their
# borders. The cell
# below checks both statements (a gain of more than a point; a change of less than two).

# %%
assert split_miou["whole + ms + flip"] > split_miou["whole"] + 0.01
assert abs(split_miou["slide"] - split_miou["whole"]) < 0.02
print("multi-scale + flip gains more than a point; sliding windows change less than two")

# %% [markdown]
# What each protocol costs for the published R-50 os8 ADE20K model on a typical ADE20K image
# (fitted to 512x683), counted on the `meta` device (no memory, no compute). Two 512x512 windows
# cover it (each 398 GMACs, docs/SPEC.md, "Published figures"); multi-scale + flip costs an order
# of magnitude more: twelve views, the larger ones dearer, 2 x (0.5² + 0.75² + ... + 1.75²) = 17.4
# whole-image passes.

# %%
big_cfg = get_config("upernet_r50_os8_ade20k")
with torch.device("meta"):
    big = build_model(big_cfg).eval()
size = (512, 683)
gmacs = {}
for name, changes in protocols.items():
    test = override(big_cfg, changes).test
    total = 0
    for s in test.scales:
        scaled = (int(size[0] * s + 0.5), int(size[1] * s + 0.5))
        if test.mode == "whole":
            total += count_macs(big, scaled, batch=1)
        else:
            total += len(inference.window_grid(scaled, test.crop_size, test.stride)) * count_macs(big, test.crop_size, batch=1)
    gmacs[name] = total * (2 if test.flip else 1) / 1e9
    print(f"{name:<20}{num_forward_passes(size, test):>4} forwards {gmacs[name]:>9.0f} GMACs")
assert gmacs["slide"] > gmacs["whole"] and gmacs["slide + ms + flip"] > gmacs["whole + ms + flip"]
tta_cost = gmacs["whole + ms + flip"] / gmacs["whole"]
print(f"multi-scale + flip costs {tta_cost:.1f}x the whole-image pass")
assert 16 < tta_cost < 19

# %% [markdown]
# ## Summary
#
# - Whole-image inference at the base scale is the published protocol: one forward pass.
# - Sliding windows keep the network at its training input size; windows at the edges are shifted
#   inside, overlapping logits averaged with a count map; the cost grows with the image area.
# - Multi-scale + flip averages the softmax of twelve views; it costs about 17x the MACs of the
#   whole-image pass (more with sliding windows). On ADE20K the paper's authors report +1.1 points
#   for UPerNet-50 (40.44 -> 41.55, docs/SPEC.md, "Paper vs published recipe"); on the demo
#   scenes here, one to two points.
# - `inference.inference` accumulates one view at a time at the output size, so TTA does not need
#   more memory than its largest forward. Every option lives in one `TestConfig`:
#   `upernet eval` and `upernet predict` take the same ones as `--test.mode=slide
#   --test.scales=... --test.flip=true` (or the shorthands `--mode`, `--scales`, `--flip`).

# %% [markdown]
# ## Questionnaire
#
# 1. Which test protocol gives the published numbers?
#    <!-- BEGIN ANSWER -->
#    *Whole image at the base scale, single scale, no flip.*
#    <!-- END ANSWER -->
# 2. Why does sliding-window inference shift the last window back inside the image?
#    <!-- BEGIN ANSWER -->
#    *So every window is a full crop of the training size and every pixel is covered.*
#    <!-- END ANSWER -->
# 3. Why are probabilities averaged over views rather than logits?
#    <!-- BEGIN ANSWER -->
#    *Logit magnitudes differ between scales; probabilities give each view one normalised vote.*
#    <!-- END ANSWER -->
# 4. How many forward passes does multi-scale + flip with six scales make on the whole image, and
#    why does it cost about 17x rather than 12x?
#    <!-- BEGIN ANSWER -->
#    *Twelve; a view at scale s costs s² of a pass, and 2 x the sum of the squared scales is 17.4.*
#    <!-- END ANSWER -->
# 5. Why must a GPU timing call `torch.cuda.synchronize()` before reading the clock?
#    <!-- BEGIN ANSWER -->
#    *CUDA kernels run asynchronously: without it the clock measures only the launch.*
#    <!-- END ANSWER -->
#
# ## Going further
#
# 1. Average logits instead of probabilities (write the loop by hand with `whole_inference`) and
#    compare the predictions with `inference.inference`: where do they differ?
# 2. Halve the sliding stride: how many forwards, and does the pixel accuracy change?
# 3. Find the smallest set of scales that gives the same prediction as the six on this image.
# 4. Time `inference.inference` with `test.flip=true` on a GPU for a 512x2048 Cityscapes-sized input,
#    whole vs sliding (crop 512x1024, stride 341x683).
