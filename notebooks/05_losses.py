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
# # 05 · The training loss: cross-entropy with an ignore label, deep supervision, OHEM
#
# The published recipe trains UPerNet with pixel-wise **cross-entropy** at the input resolution
# (docs/SPEC.md, "Training recipe"; the paper's authors use the NLL of a log-softmax at 1/4
# resolution, with no auxiliary head):
#
# $$\mathcal{L} = 1.0\cdot \mathrm{CE}(\text{out}, y) + 0.4\cdot \mathrm{CE}(\text{aux}, y),
# \qquad \mathrm{CE}(z, y) = \frac{1}{|V|}\sum_{p \in V} -\log \operatorname{softmax}(z_p)_{y_p},$$
#
# where $V$ is the set of pixels whose label is **not 255** (VOC object borders, ADE20K "other"
# after reduce-zero-label, Cityscapes void), "out" are the UPerNet logits and "aux" the logits
# of the FCN head on C4 (PSPNet's *deep supervision*, used for training only). mmsegmentation
# divides by *all* pixels instead of $|V|$; the reference recipe, and `upernet_ref.training.losses`, by
# the valid ones.
#
# We build the loss by hand on a demo scene, check it against the package, and look at the two
# options the published recipes leave off: class weights and **OHEM** (online hard example mining).

# %%
# %matplotlib inline
import inspect

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from upernet_ref import course
from upernet_ref.training import losses
from upernet_ref.configs import TrainConfig, get_config
from upernet_ref.model import build_model
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes
from upernet_ref.data.transforms import colorize, test_transform

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
image, target = DemoScenes("val")[6]      # uint8 (3, 96, 128), int64 (96, 128)
K = len(DEMO_CLASSES)
print(tuple(image.shape), tuple(target.shape), K, "classes")
print(f"ignored pixels (255): {(target == 255).float().mean().item():.4f} of the image")

# %% [markdown]
# ## 1. A plausible set of logits
#
# A trained network's logits favour the right class almost everywhere, with uncertain borders
# and a few confusions. We fabricate such logits: the correct class gets a margin that shrinks
# near region boundaries, plus noise; the ring is partly confused with the disc (same colour
# family in the demo data). Ignored pixels get arbitrary logits: they must not matter.

# %%
g = torch.Generator().manual_seed(0)
safe = target.clamp(max=K - 1)                                # 255 -> any class, for indexing
onehot = F.one_hot(safe, K).permute(2, 0, 1).float()          # (K, H, W)
blur = F.avg_pool2d(onehot[None], 7, stride=1, padding=3)[0]  # soft near boundaries
logits = 4.0 * blur + 1.0 * torch.randn(K, *target.shape, generator=g)
ring = target == DEMO_CLASSES.index("ring")
logits[DEMO_CLASSES.index("disc"), ring] += 3.0               # ring looks like a disc
logits = logits[None]                                         # (1, K, H, W)
target = target[None]                                         # (1, H, W)
per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[0]

fig, axes = plt.subplots(1, 4, figsize=(14, 2.8))
axes[0].imshow(image.permute(1, 2, 0)); axes[0].set_title("image")
axes[1].imshow(colorize(target[0], DEMO_PALETTE).permute(1, 2, 0)); axes[1].set_title("label (white = 255)")
axes[2].imshow(colorize(logits[0].argmax(0), DEMO_PALETTE).permute(1, 2, 0)); axes[2].set_title("argmax of the logits")
im = axes[3].imshow(per_pixel, cmap="magma"); axes[3].set_title("per-pixel CE (0 at 255)")
plt.colorbar(im, ax=axes[3])
for ax in axes:
    ax.set_axis_off()
course.class_legend(fig, DEMO_CLASSES, DEMO_PALETTE)
plt.show()

# %% [markdown]
# ## 2. Cross-entropy by hand, and the ignore label
#
# $-\log \operatorname{softmax}$ of the true class, averaged over the valid pixels only. Averaging
# over *all* pixels (mmsegmentation's default) counts the ignored ones as zero loss and so gives a
# smaller number; the gradients differ by the same factor.

# %% [markdown]
# ### Exercise 1 (warm-up, checked): write it before you read it
#
# Write the cross-entropy of the recipe: the mean of $-\log \operatorname{softmax}(z_p)_{y_p}$
# over the pixels whose label is not 255, and 0 (not NaN) when every pixel is ignored.
# `check_cross_entropy` compares it with `losses.cross_entropy`.

# %% tags=["raises-exception"]
def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_cross_entropy(cross_entropy)

# %%
valid = target != 255
logp = logits.log_softmax(dim=1)                                         # (1, K, H, W)
nll = -logp.gather(1, target.clamp(max=K - 1)[:, None]).squeeze(1)       # (1, H, W)
by_hand = nll[valid].mean()
ours = losses.cross_entropy(logits, target)
all_pixels = (nll * valid).sum() / valid.numel()
print(f"by hand: {by_hand.item():.4f}   package: {ours.item():.4f}   "
      f"divided by all pixels (mmseg): {all_pixels.item():.4f}")
torch.testing.assert_close(ours, by_hand)

# %% [markdown]
# Changing the logits at ignored pixels changes nothing, not even the gradient; and a crop with
# no valid pixel at all gives a loss of 0 (not the NaN of an empty mean).

# %%
wild = logits.clone()
wild[(target == 255)[:, None].expand_as(wild)] = 1e4
torch.testing.assert_close(losses.cross_entropy(wild, target), ours)
z = logits.clone().requires_grad_()
losses.cross_entropy(z, target).backward()
print("gradient at ignored pixels:", z.grad[(target == 255)[:, None].expand_as(z)].abs().max().item())
print("all-ignored crop:", losses.cross_entropy(logits, torch.full_like(target, 255)).item())

# %% [markdown]
# ## 3. Deep supervision: the auxiliary loss
#
# During training the model returns `{"out", "aux"}`, both at the input resolution. The total is
# `loss_weight x CE(out) + aux_loss_weight x CE(aux)` (1.0 and 0.4). The auxiliary head on C4
# gives the lower backbone stages a direct, short gradient path; it is dropped at test time.
# Here, with the untrained `upernet_small_demo` network, both terms are near $\log K$.

# %%
cfg = get_config("upernet_small_demo")
model = build_model(cfg).to(device).train()
x, _ = test_transform(cfg.data)(image, target[0])
# a batch of 2 (the scene and its mirror): in training mode BatchNorm needs more than one value
# per channel, and the PPM's 1x1 pooled branch has exactly one per image
xb = torch.stack([x, x.flip(-1)]).to(device)
yb = torch.cat([target, target.flip(-1)]).to(device)
outputs = model(xb)
print({k: tuple(v.shape) for k, v in outputs.items()})
total, parts = losses.segmentation_loss(outputs, yb, cfg.train)
print(f"CE(out) {parts['loss_out'].item():.2f}  CE(aux) {parts['loss_aux'].item():.2f}  "
      f"total {total.item():.2f}  (log K = {torch.log(torch.tensor(float(K))).item():.2f})")
torch.testing.assert_close(total, parts["loss_out"] + 0.4 * parts["loss_aux"])
model.eval()
print("eval mode returns:", sorted(model(xb)))

# %% [markdown]
# ## 4. Class weights
#
# Optional (`train.class_weights`): torch's weighted mean, $\sum_p w_{y_p}\ell_p / \sum_p w_{y_p}$.
# Up-weighting the ring (the class our fake logits get wrong) raises the loss.
#
# ### Exercise 2 (core, checked): the weighted cross-entropy
#
# Write `weighted_cross_entropy(logits, target, weights)`: each valid pixel's cross-entropy
# weighted by its true class's weight, summed, divided by the sum of those weights; 0 when every
# pixel is ignored. `check_weighted_cross_entropy` tries four batches.

# %% tags=["raises-exception"]
def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_weighted_cross_entropy(weighted_cross_entropy)

# %%
w = torch.ones(K)
w[DEMO_CLASSES.index("ring")] = 5.0
weighted = losses.cross_entropy(logits, target, class_weights=w)
torch.testing.assert_close(weighted, F.cross_entropy(logits, target, weight=w, ignore_index=255))
print(f"unweighted {ours.item():.4f}   ring x5 {weighted.item():.4f}")

# %% [markdown]
# ## 5. OHEM: train on the hard pixels
#
# Most pixels of a segmentation batch are easy (sky, ground). OHEM (mmsegmentation's
# `OHEMPixelSampler`) keeps only the pixels whose probability of the true class is below a
# threshold (0.7), but **at least `min_kept` per image**: if fewer are hard, the `min_kept`
# lowest-probability ones. The others are treated like ignored pixels.

# %%
prob_true = logits.softmax(1).gather(1, target.clamp(max=K - 1)[:, None]).squeeze(1)
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
im = axes[0].imshow(prob_true[0], vmin=0, vmax=1); axes[0].set_title("p(true class)")
fig.colorbar(im, ax=axes[0], shrink=0.8)
for ax, min_kept in zip(axes[1:], (1000, 8000)):
    kept = losses.ohem_mask(logits, target, thresh=0.7, min_kept=min_kept)
    ax.imshow(kept[0], cmap="gray"); ax.set_title(f"kept, min_kept={min_kept}")
    n_valid = int(valid.sum())
    print(f"min_kept {min_kept:>5}: keeps {int(kept.sum()):>5} of {n_valid} valid pixels "
          f"(hard ones, p < 0.7: {int((valid & (prob_true < 0.7)).sum())})")
    assert kept.sum() >= min(min_kept, n_valid) and not (kept & ~valid).any()
for ax in axes:
    ax.set_axis_off()
from matplotlib.patches import Patch
fig.legend(handles=[Patch(facecolor="white", edgecolor="0.4", label="kept (trained on)"),
                    Patch(facecolor="black", edgecolor="0.4", label="dropped (easy, or ignored)")],
           loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.6, -0.08))
plt.show()

# %% [markdown]
# ### Exercise 3 (stretch, checked): OHEM, before the reveal
#
# Write `ohem_mask(logits, target, thresh, min_kept)`: the (B, H, W) bool mask of the pixels OHEM
# keeps. Take the softmax probability of the true class at every valid pixel; the threshold is
# the larger of `thresh` and the (min_kept x B)-th smallest of them (the largest one when there
# are fewer valid pixels); a valid pixel is kept when its probability is below the threshold.
# `check_ohem_mask` tries five batches (one with fewer valid pixels than min_kept x B).

# %% tags=["raises-exception"]
def ohem_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_ohem_mask(ohem_mask)

# %% [markdown]
# ### OHEM by hand
#
# Written out: the probability of the true class at every valid pixel, sorted; the threshold is
# the larger of `thresh` and the (min_kept x B)-th smallest probability (the largest one when
# there are fewer valid pixels); a valid pixel is kept when its probability is below it. It must
# keep exactly the pixels `losses.ohem_mask` keeps, for small and large `min_kept`:

# %%
def ohem_by_hand(logits, target, thresh, min_kept, ignore_index=255):
    valid = target != ignore_index
    p_true = logits.softmax(1).gather(1, target.masked_fill(~valid, 0)[:, None]).squeeze(1)
    ranked = p_true[valid].sort().values
    k = min(min_kept * target.shape[0], ranked.numel() - 1)
    threshold = max(ranked[k].item(), thresh)
    return valid & (p_true < threshold)


for min_kept in (10, 1000, 8000, 10**6):
    for thresh in (0.5, 0.7, 1.0):
        ours_kept = ohem_by_hand(logits, target, thresh, min_kept)
        assert torch.equal(ours_kept, losses.ohem_mask(logits, target, thresh, min_kept))
    print(f"min_kept {min_kept:>7}: by hand == ohem_mask for thresh 0.5, 0.7, 1.0 "
          f"(thresh 0.7 keeps {int(ohem_by_hand(logits, target, 0.7, min_kept).sum())} pixels)")

# %%
ohem_cfg = TrainConfig(ohem=True, ohem_thresh=0.7, ohem_min_kept=100, aux_loss_weight=0.0)
ohem_loss, _ = losses.segmentation_loss({"out": logits}, target, ohem_cfg)
print(f"plain CE {ours.item():.4f}   OHEM CE {ohem_loss.item():.4f} (mean over the hard pixels only)")
assert ohem_loss > ours

# %% [markdown]
# The whole loss of the package, for reference:

# %%
print(inspect.getsource(losses.segmentation_loss))

# %% [markdown]
# ## Summary
#
# - The loss is CE on the main logits + 0.4 x CE on the auxiliary logits, each averaged over the
#   pixels whose label is not 255; ignored pixels contribute neither loss nor gradient.
# - Dividing by all pixels (mmsegmentation) instead of the valid ones scales the loss and the
#   gradients by the valid fraction, which changes the effective learning rate per image.
# - The auxiliary head is deep supervision: training only, `model.eval()` drops it.
# - Class weights and OHEM are options; OHEM keeps the hard pixels (p < 0.7) and at least
#   `min_kept` per image.

# %% [markdown]
# ## Questionnaire
#
# 1. Over which pixels is the cross-entropy averaged here, and over which in mmsegmentation?
# 2. What is the auxiliary loss, its weight, and is it part of the paper's UPerNet?
# 3. What gradient does an ignored pixel receive?
# 4. Which pixels does OHEM keep with `thresh=0.7, min_kept=100000`?
# 5. Why would a batch with no valid pixel need special care?
#
# ## Going further
#
# 1. With `thresh=1.0` and any `min_kept`, OHEM keeps every valid pixel. Check it.
# 2. A 512x512 crop with 5% ignored pixels: by what factor does mmsegmentation's loss differ from
#    this one? What learning rate would compensate?
# 3. Train `upernet_small_demo` with `train.aux_loss_weight=0` and compare the val mIoU after the
#    same number of iterations (notebook 08 shows how to run a short training).
