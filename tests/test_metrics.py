"""metrics: the confusion matrix and mIoU / mAcc / aAcc against a naive numpy computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from upernet_ref.collectives import all_reduce_sum
from upernet_ref.evaluation.metrics import ConfusionMatrix, confusion_matrix, summarize
from upernet_ref.reports import format_table


def naive_metrics(preds, targets, num_classes, ignore=255):
    """Python loops over pixels: the definitions of docs/SPEC.md ("Test protocol"), nothing shared with metrics."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(preds, targets):
        for pv, tv in zip(np.asarray(p).ravel(), np.asarray(t).ravel()):
            if tv != ignore:
                m[tv, pv] += 1
    ious, accs = [], []
    for c in range(num_classes):
        tp = m[c, c]
        fn = m[c, :].sum() - tp
        fp = m[:, c].sum() - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
        accs.append(tp / (tp + fn) if tp + fn > 0 else math.nan)
    valid_i = [v for v in ious if not math.isnan(v)]
    valid_a = [v for v in accs if not math.isnan(v)]
    return m, {
        "miou": sum(valid_i) / len(valid_i),
        "macc": sum(valid_a) / len(valid_a),
        "aacc": np.trace(m) / m.sum(),
        "iou": ious,
        "acc": accs,
    }


def random_batch(gen, num_classes, n=4, size=(9, 11)):
    preds, targets = [], []
    for i in range(n):
        t = torch.randint(0, num_classes, size, generator=gen)
        p = torch.randint(0, num_classes, size, generator=gen)
        p = torch.where(torch.rand(size, generator=gen) < 0.5, t, p)  # half correct
        t[torch.rand(size, generator=gen) < 0.2] = 255
        if i == 1:
            t[:] = 255  # an all-ignore image must not count at all
        preds.append(p)
        targets.append(t)
    return preds, targets


def assert_nan_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12), (a, b)


def test_matches_naive_computation_with_absent_classes():
    gen = torch.Generator().manual_seed(0)
    num_classes = 7
    preds, targets = random_batch(gen, 5)  # labels 0..4 only: classes 5 and 6 never appear
    preds[0][0, 0] = 5  # class 5 predicted but absent from the ground truth: IoU 0, acc NaN
    targets[0][0, 0] = 1
    cm = ConfusionMatrix(num_classes)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    expected_matrix, expected = naive_metrics(preds, targets, num_classes)
    np.testing.assert_array_equal(cm.matrix.numpy(), expected_matrix)
    summary = cm.summary()
    for key in ("miou", "macc", "aacc"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-12)
    assert_nan_equal(summary["iou"], expected["iou"])
    assert_nan_equal(summary["acc"], expected["acc"])
    assert summary["iou"][5] == 0.0 and math.isnan(summary["acc"][5])
    assert math.isnan(summary["iou"][6]) and math.isnan(summary["acc"][6])
    assert summary["pixels"] == int(expected_matrix.sum())


def test_ignore_pixels_never_count_and_matrix_is_rows_gt_cols_pred():
    target = torch.tensor([[0, 1, 255], [2, 255, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 0, 1]])
    m = confusion_matrix(pred, target, 3)
    assert m.dtype == torch.int64 and tuple(m.shape) == (3, 3)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    expected[0, 0] = 1  # gt 0 -> pred 0
    expected[1, 2] = 1  # gt 1 -> pred 2
    expected[2, 2] = 1
    expected[1, 1] = 1
    assert torch.equal(m, expected)
    assert confusion_matrix(pred, torch.full_like(target, 255), 3).sum() == 0


def test_all_ignore_gives_nan_and_perfect_gives_one():
    s = summarize(torch.zeros(4, 4, dtype=torch.int64))
    assert math.isnan(s["miou"]) and math.isnan(s["aacc"])
    t = torch.tensor([[0, 1], [1, 3]])
    s = summarize(confusion_matrix(t, t, 4))
    assert s["miou"] == 1.0 and s["macc"] == 1.0 and s["aacc"] == 1.0
    assert math.isnan(s["iou"][2])  # absent class left out of the mean


def test_whole_set_matrix_differs_from_mean_of_per_image_miou():
    # image A: big, all right; image B: small, all wrong. One matrix weighs pixels, not images.
    ta, pa = torch.zeros(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long)
    tb, pb = torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    whole = summarize(confusion_matrix(pa, ta, 2) + confusion_matrix(pb, tb, 2))["miou"]
    per_image = (summarize(confusion_matrix(pa, ta, 2))["miou"]
                 + summarize(confusion_matrix(pb, tb, 2))["miou"]) / 2
    assert whole == pytest.approx((100 / 102 + 0) / 2)
    assert per_image == pytest.approx((1.0 + 0.0) / 2)


def test_out_of_range_label_is_an_error():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 3)


def test_all_reduce_is_a_no_op_without_distributed_and_table_formats():
    m = torch.tensor([[3, 1], [0, 0]])
    assert torch.equal(all_reduce_sum(m.clone()), m)
    table = format_table(summarize(m), ["road", "sky"])
    lines = table.splitlines()
    assert lines[2].split() == ["road", "75.00", "75.00"]
    assert lines[3].split() == ["sky", "0.00", "nan"]
    assert "mIoU 37.50" in table and "aAcc 75.00" in table
    with pytest.raises(ValueError):
        format_table(summarize(m), ["one"])
