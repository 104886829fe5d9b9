"""Segmentation metrics from one confusion matrix: IoU, mIoU, mAcc, aAcc (docs/SPEC.md, "Test protocol").

The published protocol accumulates a single `num_classes x num_classes` confusion matrix over
the *whole* validation set (rows = ground truth, columns = prediction; pixels labelled 255 are
ignored) and computes every metric from it at the end:

    IoU_c = TP_c / (TP_c + FP_c + FN_c)      Acc_c = TP_c / (TP_c + FN_c)
    mIoU  = mean_c IoU_c                     aAcc  = sum_c TP_c / valid pixels

A class absent from both the ground truth and the predictions has 0 / 0: its IoU is NaN and it
is left out of the mean (`nanmean`). Its accuracy is NaN whenever it has no ground-truth pixel.
Averaging per-image mIoUs instead gives a different (and not the published) number.
"""
from __future__ import annotations

import typing

import torch

from upernet_ref.collectives import all_reduce_sum


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """The (num_classes, num_classes) int64 confusion matrix of class indices, on their device.

    Args:
        pred: predicted class indices (argmax of the logits), any shape.
        target: ground-truth labels of the same shape; `ignore_index` pixels never count.
        num_classes: number of classes C; labels must be in 0..C-1 (or `ignore_index`).

    Entry [t, p] counts pixels of ground truth t predicted as p (one `bincount` of t * C + p).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(f"target label {bad} is outside 0..{num_classes - 1} and not "
                         f"ignore_index={ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction outside 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def summarize(matrix: torch.Tensor) -> dict[str, typing.Any]:
    """mIoU, mAcc, aAcc (fractions in [0, 1]) and per-class `iou` / `acc` lists (NaN if absent).

    Keys: `miou`, `macc`, `aacc`, `iou`, `acc`, `pixels` (valid pixels counted),
    `gt_pixels` and `pred_pixels` per class.
    """
    m = matrix.detach().to("cpu", torch.float64)
    tp = m.diagonal()
    gt = m.sum(dim=1)  # TP + FN: pixels of each class in the ground truth
    pr = m.sum(dim=0)  # TP + FP: pixels predicted as each class
    union = gt + pr - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = m.sum()

    def nanmean(x: torch.Tensor) -> float:
        keep = ~torch.isnan(x)
        return float(x[keep].mean()) if keep.any() else float("nan")

    return {
        "miou": nanmean(iou),
        "macc": nanmean(acc),
        "aacc": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": [float(v) for v in iou],
        "acc": [float(v) for v in acc],
        "pixels": int(total),
        "gt_pixels": [int(v) for v in gt],
        "pred_pixels": [int(v) for v in pr],
    }


class ConfusionMatrix:
    """Accumulates one confusion matrix over a split, on the device of the predictions.

        cm = ConfusionMatrix(num_classes)
        for logits, mask in ...:
            cm.update(logits.argmax(1), mask)
        summary = cm.reduce().summary()
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: str | torch.device | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self.matrix.device != pred.device:
            self.matrix = self.matrix.to(pred.device)
        self.matrix += confusion_matrix(pred, target.to(pred.device), self.num_classes,
                                        self.ignore_index)

    def reduce(self) -> ConfusionMatrix:
        """Sum over processes (each rank evaluated a shard of the split), in place; NCCL needs
        the matrix on the GPU, so it stays on the device."""
        all_reduce_sum(self.matrix)
        return self

    def summary(self) -> dict[str, typing.Any]:
        return summarize(self.matrix)
