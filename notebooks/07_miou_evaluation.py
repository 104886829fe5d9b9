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
# # 07 · Measuring a segmentation: the confusion matrix and mIoU
#
# Every number in the published UPerNet table (docs/SPEC.md, "The 12 published results") is a
# **mean intersection-over-union** on a validation set, computed with one precise protocol
# (docs/SPEC.md, "Test protocol"):
#
# - one `C x C` **confusion matrix** is accumulated over the *whole* split (rows = ground truth,
#   columns = prediction), pixels labelled **255 are ignored**;
# - per class, $\mathrm{IoU}_c = \frac{TP_c}{TP_c + FP_c + FN_c}$, and mIoU is their mean,
#   **leaving out classes absent from both prediction and ground truth** (0/0 = NaN);
# - side metrics: per-class accuracy $\mathrm{Acc}_c = \frac{TP_c}{TP_c + FN_c}$ (mAcc = their
#   mean) and the overall pixel accuracy aAcc = correct / valid pixels.
#
# In this notebook we build all of it by hand, with numpy, on a demo scene and a deliberately
# corrupted prediction, look at three pitfalls (ignore pixels, absent classes, per-image
# averaging) and finally check that the hand-built numbers equal `upernet_ref.evaluation.metrics`.

# %%
# %matplotlib inline
import inspect

import matplotlib.pyplot as plt
import numpy as np
import scipy.ndimage as ndi
import torch

from upernet_ref import course, reports
from upernet_ref.evaluation import metrics
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes
from upernet_ref.data.transforms import colorize

_ = torch.manual_seed(0)
device = course.pick_device()  # the package's confusion matrix runs where the predictions are
course.exact_comparisons()  # (integer counts here; kept so every comparison cell runs the same on a GPU)
rng = np.random.default_rng(0)
C = len(DEMO_CLASSES)
print(C, DEMO_CLASSES)

# %% [markdown]
# ## 1. A scene and a plausible wrong prediction
#
# We take a validation scene of the embedded demo data and fabricate the kind of prediction a
# half-trained network makes: boundaries a couple of pixels off, one shape confused with its
# look-alike (the *ring* partly predicted as a *disc*, same colour family), and a few scattered
# wrong pixels. A network never predicts 255, so the ignored pixels get the nearest real label.

# %%
image, gt = DemoScenes("val")[1]
image, gt = image.numpy(), gt.numpy()               # (3, 96, 128) uint8, (96, 128) int64
print("image", image.shape, image.dtype, "| labels", gt.shape, gt.dtype)
print("classes present:", [DEMO_CLASSES[c] for c in np.unique(gt) if c != 255])
print(f"ignored pixels: {(gt == 255).sum()} of {gt.size} ({(gt == 255).mean():.2%})")


# %%
def corrupt(gt, rng):
    # the nearest valid label for every ignored pixel
    _, (iy, ix) = ndi.distance_transform_edt(gt == 255, return_indices=True)
    pred = gt[iy, ix]
    pred = np.roll(pred, shift=2, axis=1)            # boundaries 2 px to the right
    ring = np.argwhere(pred == 6)
    if len(ring):                                     # left part of the ring seen as a disc
        left = pred == 6
        left[:, int(np.median(ring[:, 1])):] = False
        pred[left] = 2
    speckle = rng.random(pred.shape) < 0.03           # 3% random pixels, among the scene's classes
    present = np.unique(gt[gt != 255])
    pred[speckle] = rng.choice(present, speckle.sum())
    return pred

pred = corrupt(gt, rng)
print("prediction", pred.shape, pred.dtype, "values", np.unique(pred).tolist())

# %%
wrong = (pred != gt) & (gt != 255)
panels = [(image.transpose(1, 2, 0), "image"),
          (colorize(torch.from_numpy(gt), DEMO_PALETTE).permute(1, 2, 0), "ground truth (255 white)"),
          (colorize(torch.from_numpy(pred), DEMO_PALETTE).permute(1, 2, 0), "prediction"),
          (wrong, "errors (ignored pixels never count)")]
fig, axes = plt.subplots(1, 4, figsize=(14, 3))
for ax, (img, title) in zip(axes, panels):
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_title(title)
    ax.axis("off")
course.class_legend(fig, DEMO_CLASSES, DEMO_PALETTE)
plt.show()

# %% [markdown]
# ## 2. The confusion matrix
#
# Entry `[t, p]` counts the pixels of true class `t` predicted as `p`. Drop the ignored pixels
# first, then one `bincount` of `t * C + p` fills the whole matrix (this is what
# `metrics.confusion_matrix` does, on the GPU when the tensors are there).

# %% [markdown]
# ### Exercise 1 (warm-up, checked): write it before you read it
#
# Write the confusion matrix with one `torch.bincount` (rows = ground truth, columns =
#    prediction, label 255 skipped). `check_confusion_matrix` compares it with
#    `metrics.confusion_matrix` and tells you if rows and columns are swapped.

# %% tags=["raises-exception"]
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_confusion_matrix(confusion_matrix)

# %%
valid = gt != 255
t, p = gt[valid], pred[valid]
matrix = np.bincount(t * C + p, minlength=C * C).reshape(C, C)

# the same thing with an explicit loop over pixels, to be sure what the one-liner means
slow = np.zeros((C, C), dtype=np.int64)
for ti, pi in zip(t, p):
    slow[ti, pi] += 1
assert (slow == matrix).all()
print("valid pixels:", matrix.sum())
print("     " + " ".join(f"{n[:5]:>6}" for n in DEMO_CLASSES) + "   <- predicted")
for name, row in zip(DEMO_CLASSES, matrix):
    print(f"{name[:5]:>5}" + " ".join(f"{v:6d}" for v in row))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
row_share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
for ax, values, title, text in ((axes[0], np.log1p(matrix), "pixels (colour: log(1 + count))", matrix),
                                (axes[1], row_share, "share of each true class (rows sum to 1)", row_share)):
    im = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(C), DEMO_CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(C), DEMO_CLASSES)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    for t in range(C):
        for p_ in range(C):
            label = f"{text[t, p_]:d}" if text.dtype.kind == "i" else f"{text[t, p_]:.2f}"
            if text[t, p_]:
                ax.text(p_, t, label, ha="center", va="center", fontsize=7,
                        color="white" if values[t, p_] < 0.6 * values.max() else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. TP, FP, FN and the metrics
#
# The diagonal holds the true positives. A row sums to the class's ground-truth pixels
# ($TP + FN$), a column to the pixels predicted as that class ($TP + FP$). The union in the IoU is
# row + column - diagonal.

# %% [markdown]
# ### Exercise 2 (core, checked): the IoU, before you read it
#
# Write the per-class IoU from a confusion matrix, NaN for a class that appears neither in the
#    ground truth nor in the prediction. `check_iou` compares it with `metrics.summarize`.

# %% tags=["raises-exception"]
def per_class_iou(matrix: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_iou(per_class_iou)

# %%
tp = np.diag(matrix).astype(float)
fn = matrix.sum(1) - tp                   # missed pixels of the class
fp = matrix.sum(0) - tp                   # pixels wrongly given the class
union = tp + fp + fn
with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(tp + fn > 0, tp / (tp + fn), np.nan)

print(f"{'class':<9}{'TP':>6}{'FP':>6}{'FN':>6}{'IoU':>8}{'Acc':>8}")
for c in range(C):
    print(f"{DEMO_CLASSES[c]:<9}{tp[c]:6.0f}{fp[c]:6.0f}{fn[c]:6.0f}{iou[c]:8.4f}{acc[c]:8.4f}")

miou, macc = np.nanmean(iou), np.nanmean(acc)
aacc = tp.sum() / matrix.sum()
print(f"mIoU {miou:.4f}  mAcc {macc:.4f}  aAcc {aacc:.4f}")


# %% [markdown]
# Read the table: *disc* has no ground-truth pixel but is predicted (the confused ring), so its
# IoU is 0 and its accuracy undefined (NaN); *triangle* is in neither, so both are NaN and it is
# left out of every mean. aAcc is dominated by the big classes (sky, ground), which is why the
# papers report mIoU: every class weighs the same.
#
# ## 4. Pitfall 1: the ignored pixels
#
# VOC's object boundaries, ADE20K's "other" and Cityscapes' void are labelled 255. They are not
# a class, and a prediction there is neither right nor wrong. Counting them, e.g. by mapping 255
# to a real class before the bincount, moves the numbers:

# %%
def miou_of(matrix):
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(union > 0, tp / union, np.nan))

as_ground = np.where(gt == 255, 1, gt)    # wrongly: ignore -> "ground"
wrong_matrix = np.bincount((as_ground * C + pred).ravel(), minlength=C * C).reshape(C, C)
print(f"255 ignored (correct): mIoU {miou_of(matrix):.4f}")
print(f"255 counted as ground: mIoU {miou_of(wrong_matrix):.4f}")
assert abs(miou_of(matrix) - miou_of(wrong_matrix)) > 1e-3

# %% [markdown]
# Labels are never silently clipped in this package either: a label that is neither a class nor
# 255 is an error, not a pixel quietly moved into the last class.

# %%
try:
    metrics.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 9]), num_classes=C)
except ValueError as error:
    print("ValueError:", error)

# %% [markdown]
# ## 5. Pitfall 2: absent classes
#
# A class missing from both prediction and ground truth has IoU 0/0. Treating it as 0 punishes
# the model for something it got right (it predicted nothing, and there was nothing); treating it
# as 1 rewards it for free. The protocol leaves it out (NaN + `nanmean`). On one image, with only
# six of eight classes present, the choice matters a lot; over a whole validation set almost every
# class appears and the three agree more.

# %%
print(f"absent -> NaN, left out: mIoU {np.nanmean(iou):.4f}  (the protocol)")
print(f"absent -> 0:             mIoU {np.nan_to_num(iou, nan=0.0).mean():.4f}")
print(f"absent -> 1:             mIoU {np.nan_to_num(iou, nan=1.0).mean():.4f}")

# %% [markdown]
# ## 6. Pitfall 3: per-image average vs one matrix over the split
#
# Averaging per-image mIoUs weighs every image equally, so a small object that is missed in one
# image costs as much as a whole misclassified scene; and per image more classes are absent.
# The published protocol sums the confusion matrices of all images first. Below, ten validation
# scenes get corrupted predictions, some much worse than others.
#
# ### Exercise 3 (stretch, checked): the mIoU of a split
#
# Write `miou_over_split(pairs, num_classes)`: the mIoU (a fraction, 0..1) of a list of
# (prediction, target) maps of any sizes, by the protocol: one confusion matrix over the split
# (your `confusion_matrix`), its per-class IoU (your `per_class_iou`), the mean over the
# classes that occur.
# `check_miou_over_split` tries four splits (one with classes that occur nowhere).

# %% tags=["raises-exception"]
def miou_over_split(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> float:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_miou_over_split(miou_over_split)

# %%
val = DemoScenes("val")
total = np.zeros((C, C), dtype=np.int64)
per_image = []
for i in range(10):
    _, g = val[i]
    g = g.numpy()
    q = corrupt(g, rng)
    if i % 3 == 0:                      # every third image: the ground is taken for sky
        q = np.where(q == 1, 0, q)
    m = np.bincount(g[g != 255] * C + q[g != 255], minlength=C * C).reshape(C, C)
    total += m
    per_image.append(miou_of(m))
print("per-image mIoU:", " ".join(f"{v:.3f}" for v in per_image))
print(f"mean of per-image mIoU: {np.mean(per_image):.4f}")
print(f"one matrix over the set: {miou_of(total):.4f}  (the protocol)")

# %% [markdown]
# ## 7. The package
#
# `upernet_ref.evaluation.metrics` is the same computation in torch: `confusion_matrix` (one bincount, on
# the tensors' device), `summarize` (the metrics, NaN for absent classes), a `ConfusionMatrix`
# accumulator whose `reduce()` sums the matrices of all processes under `torch.distributed`
# (each GPU evaluates a shard of the split); `upernet_ref.reports.format_table` prints the table.

# %%
print(inspect.getsource(metrics.summarize))

# %%
package_matrix = metrics.confusion_matrix(torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device), C).cpu()
summary = metrics.summarize(package_matrix)
print(reports.format_table(summary, DEMO_CLASSES))

assert (package_matrix.numpy() == matrix).all()
torch.testing.assert_close(torch.tensor(summary["iou"], dtype=torch.float64), torch.from_numpy(iou), equal_nan=True)
torch.testing.assert_close(torch.tensor(summary["acc"], dtype=torch.float64), torch.from_numpy(acc), equal_nan=True)
for key, mine in (("miou", miou), ("macc", macc), ("aacc", aacc)):
    assert abs(summary[key] - mine) < 1e-12, key

cm = metrics.ConfusionMatrix(C)
for i in range(10):                     # the accumulator gives the whole-set number
    _, g = val[i]
    cm.update(torch.zeros_like(g), g)   # a model that always says "sky"
s = cm.reduce().summary()
print(f"always 'sky': mIoU {s['miou']:.4f}  aAcc {s['aacc']:.4f}")
# all valid pixels are predicted sky: IoU(sky) = sky / valid = aAcc, every other class 0
assert abs(s["aacc"] - s["iou"][0]) < 1e-12 and s["iou"][1] == 0.0
present = sum(not np.isnan(v) for v in s["iou"])
assert abs(s["miou"] - s["aacc"] / present) < 1e-12

# %% [markdown]
# ## Summary
#
# - One confusion matrix (rows = truth, columns = prediction) over the whole split holds
#   everything: IoU, per-class accuracy, pixel accuracy are ratios of its diagonal, rows and
#   columns.
# - Pixels labelled 255 are dropped before counting; labels outside the classes are errors.
# - Classes absent from both prediction and truth are NaN and left out of the means.
# - The published number is the mIoU of the summed matrix, not the mean of per-image mIoUs.
# - `upernet_ref.evaluation.metrics` computes exactly the numbers built here by hand; `upernet eval` and
#   the trainer's validation use it (see notebook 09 for how the predictions are made).

# %% [markdown]
# ## Questionnaire
#
# 1. Why is one confusion matrix accumulated over the whole split instead of averaging per-image
#    mIoUs?
# 2. What are the rows and the columns of the confusion matrix here?
# 3. How is a class absent from both ground truth and prediction counted in mIoU?
# 4. What is the difference between mAcc and aAcc?
# 5. In the confusion matrix above, which class is mistaken for which, and why?
#
# ## Going further
#
# 1. Compute the frequency-weighted IoU (each class's IoU weighted by its ground-truth pixels)
#    from `matrix`. Is it closer to mIoU or to aAcc, and why?
# 2. Show that aAcc equals the mean of the per-class accuracies weighted by ground-truth pixels.
# 3. Change `corrupt` so that the ring is *entirely* predicted as disc. Which IoUs change, and
#    how does mAcc react compared with mIoU?
# 4. Split the ten images over two "processes" (two matrices) and check that summing them before
#    `summarize` gives the single-process result, while averaging the two mIoUs does not.
