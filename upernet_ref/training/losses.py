"""The training loss: cross-entropy on the main logits + 0.4 x cross-entropy on the auxiliary ones.

docs/SPEC.md, "Training recipe": pixel-wise cross-entropy averaged over the pixels whose label
is not the ignore index (255: VOC object borders, ADE20K "other" after reduce-zero-label,
Cityscapes void), weight 1.0 on the UPerNet output and 0.4 on the FCN auxiliary head on C4
(PSPNet's deep supervision, Zhao et al. 2017, section 3.3). mmsegmentation divides by *all*
pixels instead; the reference recipe, and this module, divide by the non-ignored ones.

Two options that the published recipes leave off: per-class weights (torch's weighted mean,
dividing by the summed weights of the counted pixels) and OHEM, online hard example mining,
with mmsegmentation's `OHEMPixelSampler` semantics: of the non-ignored pixels keep those whose
predicted probability of the true class is below `thresh`, and at least `min_kept` per image
(the `min_kept` x batch hardest ones); the others are treated like ignored pixels. OHEM looks
at the main logits only and applies the same kept pixels to both heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from upernet_ref.configs import TrainConfig


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not `ignore_index`.

    Args:
        logits: (B, K, H, W) unnormalised scores.
        target: (B, H, W) int64 labels in 0..K-1 or `ignore_index`.
        class_weights: optional (K,) weights; the mean is then weighted, as in torch.

    A batch with no valid pixel gives 0 (with a gradient of zeros), not NaN.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         f"differ in size; resize the logits to the label size first")
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weights,
                                ignore_index=ignore_index, reduction="none")  # (B, H, W), 0 at ignored
    valid = target != ignore_index
    if class_weights is None:
        denom = valid.sum().to(per_pixel.dtype)
    else:
        denom = class_weights.to(per_pixel.dtype)[target[valid]].sum()
    return per_pixel.sum() / denom.clamp(min=torch.finfo(per_pixel.dtype).eps)


@torch.no_grad()
def ohem_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
              min_kept: int = 100_000, ignore_index: int = 255) -> torch.Tensor:
    """The (B, H, W) bool mask of the pixels OHEM keeps (mmseg `OHEMPixelSampler`).

    A valid pixel is kept when the softmax probability of its true class is below
    max(thresh, p_k), where p_k is the (min_kept x B)-th smallest such probability: so all
    "hard" pixels are kept, and at least min_kept x B pixels. With fewer valid pixels than
    that, p_k is the largest probability and, as in mmseg, the easiest pixel(s) are dropped
    unless their probability is below `thresh`.
    """
    valid = target != ignore_index
    safe_target = target.masked_fill(~valid, 0).unsqueeze(1)  # (B, 1, H, W)
    prob = logits.float().softmax(dim=1).gather(1, safe_target).squeeze(1)  # (B, H, W)
    valid_prob = prob[valid]
    if valid_prob.numel() == 0:
        return valid
    batch_kept = min_kept * target.shape[0]
    sorted_prob = valid_prob.sort().values
    threshold = max(sorted_prob[min(batch_kept, sorted_prob.numel() - 1)].item(), thresh)
    return valid & (prob < threshold)


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      train_cfg: TrainConfig,
                      ignore_index: int = 255) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of the recipe (docs/SPEC.md, "Training recipe"), and its parts for logging.

    Args:
        outputs: the model's {"out": (B, K, H, W), "aux": (B, K, H, W) (optional)}.
        target: (B, H, W) int64 labels.
        train_cfg: `loss_weight`, `aux_loss_weight`, `class_weights`, `ohem*`.

    Returns:
        (total, {"loss_out": ..., "loss_aux": ...}) where the parts are the *unweighted*,
        detached cross-entropies; total = loss_weight x out + aux_loss_weight x aux.
    """
    logits = outputs["out"]
    weights = None
    if train_cfg.class_weights:
        if len(train_cfg.class_weights) != logits.shape[1]:
            raise ValueError(f"train.class_weights has {len(train_cfg.class_weights)} values but "
                             f"the model predicts {logits.shape[1]} classes")
        weights = torch.tensor(train_cfg.class_weights, dtype=torch.float32, device=logits.device)
    if train_cfg.ohem:
        kept = ohem_mask(logits, target, train_cfg.ohem_thresh, train_cfg.ohem_min_kept,
                         ignore_index)
        target = target.masked_fill(~kept, ignore_index)

    loss_out = cross_entropy(logits, target, ignore_index, weights)
    total = train_cfg.loss_weight * loss_out
    parts = {"loss_out": loss_out.detach()}
    if "aux" in outputs and train_cfg.aux_loss_weight > 0:
        loss_aux = cross_entropy(outputs["aux"], target, ignore_index, weights)
        total = total + train_cfg.aux_loss_weight * loss_aux
        parts["loss_aux"] = loss_aux.detach()
    return total, parts
