"""upernet_ref.course: every exercise checker accepts a right answer and explains a wrong one."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from upernet_ref import course
from upernet_ref.model.layers import resize


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def ppm(x, ppm):
    outs = [x] + [resize(branch(F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                  for s, branch in zip(ppm.pool_scales, ppm.branches)]
    return ppm.bottleneck(torch.cat(outs, 1))


def top_down(laterals):
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], laterals[i - 1].shape[-2:],
                                                          mode="bilinear", align_corners=False)
    return laterals


def rescale_size(h, w, scale):
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def cross_entropy(logits, target):
    valid = target != 255
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    return per_pixel.sum() / valid.sum().clamp(min=1)


def poly_lr(it, max_iters, base, min_lr, power, warmup_iters, warmup_ratio):
    lr = (base - min_lr) * (1 - min(it, max_iters) / max_iters) ** power + min_lr
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


def confusion_matrix(pred, target, c):
    keep = target != 255
    return torch.bincount(target[keep] * c + pred[keep], minlength=c * c).reshape(c, c)


def iou(m):
    tp = m.diagonal().double()
    union = m.sum(0) + m.sum(1) - m.diagonal()
    return torch.where(union > 0, tp / union.clamp(min=1), torch.tensor(float("nan")).double())


def segmentation_loss(outputs, target):
    return cross_entropy(outputs["out"], target) + 0.4 * cross_entropy(outputs["aux"], target)


def flip_inference(model, image):
    p = model(image)["out"].softmax(1) + model(image.flip(-1))["out"].flip(-1).softmax(1)
    return p / 2


def strides_and_dilations(output_stride):
    strides, dilations, current, dilation = [], [], 4, 1
    for s in (1, 2, 2, 2):
        if current * s > output_stride:
            strides.append(1)
            dilation *= s
        else:
            strides.append(s)
            current *= s
        dilations.append(dilation)
    return tuple(strides), tuple(dilations)


class Bottleneck(torch.nn.Module):
    def __init__(self, cin, planes, stride, dilation, relu_first=False, stride_1x1=False):
        super().__init__()
        nn = torch.nn
        self.relu_first = relu_first
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, stride if stride_1x1 else 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1 if stride_1x1 else stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or cin != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y) + shortcut if self.relu_first else F.relu(y + shortcut)


def bin_edges(n, s):
    import math
    return [(math.floor(i * n / s), math.ceil((i + 1) * n / s)) for i in range(s)]


def crop_is_acceptable(mask, ratio):
    counts = torch.bincount(mask.flatten(), minlength=256)
    counts[255] = 0
    present = counts[counts > 0]
    return len(present) > 1 and present.max().item() / present.sum().item() < ratio


def hflip_pair(image, mask):
    return image.flip(-1), mask.flip(-1)


def ohem_mask(logits, target, thresh, min_kept):
    valid = target != 255
    p = logits.softmax(1).gather(1, target.masked_fill(~valid, 0)[:, None]).squeeze(1)
    ranked = p[valid].sort().values
    k = min(min_kept * target.shape[0], ranked.numel() - 1)
    return valid & (p < max(ranked[k].item(), thresh))


def epochs_to_iters(epochs, n, b):
    return epochs * max(1, int(n / b + 0.5))


def miou_over_split(pairs, c):
    m = sum(confusion_matrix(p, t, c) for p, t in pairs)
    return iou(m).nanmean().item()


def sgd_update(p, g, buf, lr, momentum, wd):
    buf = momentum * buf + g + wd * p
    return p - lr * buf, buf


def training_step(model, images, masks, buffers, it, tc, train=True, aux=0.4, decay=True, zero_grad=True,
                  keep=True, poly=True, no_grad=True, in_place=True, loss=cross_entropy):
    """One recipe iteration (and, by its flags, the mistakes a student makes)."""
    if train:
        model.train()
    if zero_grad:
        model.zero_grad()
    outputs = model(images)
    value = loss(outputs["out"], masks) + aux * loss(outputs["aux"], masks)
    value.backward()
    lr = (tc.lr - tc.min_lr) * (1 - it / tc.max_iters) ** tc.lr_power + tc.min_lr if poly else tc.lr
    with torch.no_grad() if no_grad else torch.enable_grad():
        for p, b in zip(model.parameters(), buffers):
            d = p.grad + tc.weight_decay * p if decay else p.grad
            new = b.mul_(tc.momentum).add_(d) if keep else tc.momentum * b + d
            if in_place:
                p.sub_(lr * new)
            else:
                p = p - lr * new
    return value.item()


def _step_with(**mistake):
    return lambda *args: training_step(*args, **mistake)


def lr_curve(tc, start, per_epoch=False, late=0, extra=0, warmup=True, restart=False, from_zero=False):
    """A run's learning rates from `start` (and, by its flags, the mistakes a student makes)."""
    total = tc.max_iters - start if restart else tc.max_iters
    first = 0 if restart or from_zero else start
    last = first + (tc.max_iters - start if restart else tc.max_iters - first) + extra
    its = [it // tc.iters_per_epoch * tc.iters_per_epoch if per_epoch else it + late for it in range(first, last)]
    return [poly_lr(it, total, tc.lr, tc.min_lr, tc.lr_power, tc.warmup_iters if warmup else 0, tc.warmup_ratio)
            for it in its]


def _curve_with(**mistake):
    return lambda tc, start: lr_curve(tc, start, **mistake)


def slide_inference(model, image, crop, stride):
    h, w = image.shape[-2:]
    total, count = 0, torch.zeros(1, 1, h, w)
    rows = range(0, max(h - crop[0], 0) + stride[0], stride[0])
    cols = range(0, max(w - crop[1], 0) + stride[1], stride[1])
    for y in sorted({min(r, max(h - crop[0], 0)) for r in rows}):
        for x in sorted({min(c, max(w - crop[1], 0)) for c in cols}):
            win = image[..., y:y + crop[0], x:x + crop[1]]
            ph, pw = win.shape[-2:]
            out = model(F.pad(win, (0, crop[1] - pw, 0, crop[0] - ph)))["out"][..., :ph, :pw]
            total = total + F.pad(out, (x, w - x - pw, y, h - y - ph))
            count[..., y:y + ph, x:x + pw] += 1
    return total / count


def ppm_parameters(cin, c, scales):
    return len(scales) * (cin * c + 2 * c) + (cin + len(scales) * c) * c * 9 + 2 * c


def fuse_and_classify(outs, head):
    size = outs[0].shape[-2:]
    return head.classifier(head.dropout(head.fuse(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], 1))))


def laterals(feats, head):
    return [conv(f) for conv, f in zip(head.lateral_convs, feats[:-1])] + [head.ppm(feats[-1])]


def weighted_cross_entropy(logits, target, weights):
    valid = target != 255
    per_pixel = F.cross_entropy(logits, target, weight=weights, ignore_index=255, reduction="none")
    return per_pixel.sum() / weights[target[valid]].sum().clamp(min=1e-12)


def multiscale_flip(model, image, scales, out_size):
    h, w = image.shape[-2:]
    probs = []
    for s in scales:
        scaled = resize(image, (int(h * s + 0.5), int(w * s + 0.5)))
        for mirrored in (False, True):
            logits = model(scaled.flip(-1) if mirrored else scaled)["out"]
            probs.append(resize(logits.flip(-1) if mirrored else logits, out_size).softmax(1))
    return torch.stack(probs).mean(0)


RIGHT = [(course.check_conv_output_size, conv_output_size), (course.check_ppm, ppm),
         (course.check_top_down, top_down), (course.check_rescale_size, rescale_size),
         (course.check_cross_entropy, cross_entropy), (course.check_poly_lr, poly_lr),
         (course.check_confusion_matrix, confusion_matrix), (course.check_iou, iou),
         (course.check_segmentation_loss, segmentation_loss),
         (course.check_flip_inference, flip_inference),
         (course.check_strides_and_dilations, strides_and_dilations), (course.check_bottleneck, Bottleneck),
         (course.check_bin_edges, bin_edges), (course.check_crop_is_acceptable, crop_is_acceptable),
         (course.check_hflip_pair, hflip_pair), (course.check_ohem_mask, ohem_mask),
         (course.check_epochs_to_iters, epochs_to_iters), (course.check_miou_over_split, miou_over_split),
         (course.check_sgd_update, sgd_update), (course.check_slide_inference, slide_inference),
         (course.check_ppm_parameters, ppm_parameters), (course.check_fuse_and_classify, fuse_and_classify),
         (course.check_laterals, laterals), (course.check_weighted_cross_entropy, weighted_cross_entropy),
         (course.check_multiscale_flip, multiscale_flip), (course.check_training_step, training_step),
         (course.check_lr_curve, lr_curve)]


@pytest.mark.parametrize("checker, answer", RIGHT, ids=[c.__name__ for c, _ in RIGHT])
def test_a_right_answer_passes(checker, answer, capsys):
    checker(answer)
    assert "correct" in capsys.readouterr().out


def _no_minlength(p, t, c):
    keep = t != 255
    return torch.bincount(t[keep] * c + p[keep]).reshape(c, c)


def _iou_nan_when_absent_from_truth(m):
    m = m.double()
    return torch.where(m.sum(1) > 0, m.diagonal() / (m.sum(0) + m.sum(1) - m.diagonal()).clamp(min=1),
                       torch.tensor(float("nan")).double())


def _iou_nan_when_never_predicted(m):
    m = m.double()
    return torch.where(m.sum(0) > 0, m.diagonal() / (m.sum(0) + m.sum(1) - m.diagonal()).clamp(min=1),
                       torch.tensor(float("nan")).double())


def _ce_nan_when_all_ignored(lo, t):
    valid = t != 255
    return F.cross_entropy(lo, t, ignore_index=255, reduction="sum") / valid.sum()


def _ppm_without_c5(x, m):
    outs = [resize(b(F.adaptive_avg_pool2d(x, s)), x.shape[-2:]) for s, b in zip(m.pool_scales, m.branches)]
    return m.bottleneck(torch.cat(outs, 1))


def _poly_without_warmup_guard(it, T, b, mn, p, wi, wr):
    lr = (b - mn) * (1 - min(it, T) / T) ** p + mn
    return lr * (1 - (1 - it / wi) * (1 - wr)) if it < wi or wi == 0 else lr


def _confusion_with_255(p, t, c):
    return torch.bincount(t.flatten() * c + p.flatten(), minlength=c * c).reshape(c, c)


# The wrong answers a student writes (from issue 17's trial: 84 plausible ones, the six that passed
# and the ones that gave raw torch errors among them), each with the words its message must have.
WRONG = [
    (course.check_conv_output_size, lambda s, k, st, p, d: (s + 2 * p - k) // st + 1, "dilation is missing"),
    (course.check_conv_output_size, lambda s, k, st, p, d: (s + 2 * p - d * (k - 1) - 1) / st + 1, "expected an int"),
    (course.check_ppm, lambda x, m: m.bottleneck(torch.cat([x] + [resize(b(F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                                                                for s, b in zip(m.pool_scales, m.branches)][:-1], 1)),
     "raised RuntimeError.*concatenated"),
    (course.check_ppm, _ppm_without_c5, "C5 itself"),
    (course.check_ppm, lambda x, m: m.bottleneck(torch.cat([x] + [b(resize(F.adaptive_avg_pool2d(x, s), x.shape[-2:]))
                                                                for s, b in zip(m.pool_scales, m.branches)], 1)),
     "after the upsampling"),
    (course.check_ppm, lambda x, m: m.bottleneck(torch.cat([x] + [F.interpolate(b(F.adaptive_avg_pool2d(x, s)), x.shape[-2:],
                                                                                mode="bilinear", align_corners=True)
                                                                for s, b in zip(m.pool_scales, m.branches)], 1)),
     "align_corners=True"),
    (course.check_top_down, lambda ls: ls[:3], "list of 4"),
    (course.check_top_down, lambda ls: [ls[i] + resize(ls[i + 1], ls[i].shape[-2:]) for i in range(3)] + [ls[3]],
     "not cumulative"),
    (course.check_rescale_size, lambda h, w, s: (int(h * min(s) / min(h, w) + 0.5), int(w * min(s) / min(h, w) + 0.5)),
     "only the short side"),
    (course.check_rescale_size, lambda h, w, s: tuple(round(v * min(max(s) / max(h, w), min(s) / min(h, w))) for v in (h, w)),
     "round"),
    (course.check_rescale_size, lambda h, w, s: tuple(int(v * min(max(s) / max(h, w), min(s) / min(h, w))) for v in (h, w)),
     "truncated"),
    (course.check_cross_entropy, lambda lo, t: F.cross_entropy(lo, t, ignore_index=255), "not NaN|NaN for"),
    (course.check_cross_entropy, _ce_nan_when_all_ignored, "NaN for an all-ignored batch"),
    (course.check_cross_entropy, lambda lo, t: F.cross_entropy(lo, t), "255 was not removed"),
    (course.check_cross_entropy, lambda lo, t: F.cross_entropy(lo, t, ignore_index=255, reduction="sum") / t.numel(),
     "averaged over every pixel"),
    (course.check_poly_lr, lambda it, T, b, m, p, wi, wr: (b - m) * (1 - min(it, T) / T) ** p + m, "no warmup"),
    (course.check_poly_lr, _poly_without_warmup_guard, "raised ZeroDivisionError.*warmup_iters can be 0"),
    (course.check_poly_lr, lambda it, T, b, m, p, wi, wr: poly_lr(min(it, T - 1) if it > T else it, T, b, m, p, wi, wr)
     if it <= T else (b - m) * (1 - it / T) ** p + m, "complex|clamp|differ|expected"),
    (course.check_confusion_matrix, lambda p, t, c: confusion_matrix(p, t, c).T, "swapped"),
    (course.check_confusion_matrix, _no_minlength, "minlength"),
    (course.check_confusion_matrix, _confusion_with_255, "raised RuntimeError|255 was not removed"),
    (course.check_confusion_matrix, lambda p, t, c: torch.bincount(t.flatten().clamp(max=c - 1) * c + p.flatten(),
                                                                   minlength=c * c).reshape(c, c), "255 was not removed"),
    (course.check_iou, lambda m: m.diagonal().double() / m.sum(1).double(), "class accuracy|NaN for class"),
    (course.check_iou, _iou_nan_when_absent_from_truth, "NaN for class 2"),
    (course.check_iou, _iou_nan_when_never_predicted, "NaN for class 2"),
    (course.check_iou, lambda m: m.diagonal().double() / (m.sum(0) + m.sum(1)).double(), "counted twice"),
    (course.check_iou, lambda m: m.diagonal().double() / (m.sum(0) + m.sum(1) - m.diagonal()).double().clamp(min=1),
     "empty union"),
    (course.check_segmentation_loss, lambda o, t: cross_entropy(o["out"], t) + cross_entropy(o["aux"], t), "weight 1"),
    (course.check_segmentation_loss, lambda o, t: cross_entropy(o["out"], t), "missing"),
    (course.check_segmentation_loss, lambda o, t: _ce_nan_when_all_ignored(o["out"], t)
     + 0.4 * _ce_nan_when_all_ignored(o["aux"], t), "NaN for an all-ignored batch"),
    (course.check_flip_inference, lambda m, x: m(x)["out"].softmax(1), "mirror image is missing"),
    (course.check_flip_inference, lambda m, x: m(x)["out"][0], "shape"),
    (course.check_flip_inference, lambda m, x: ((m(x)["out"] + m(x.flip(-1))["out"].flip(-1)) / 2).softmax(1),
     "averaged logits, not probabilities"),
    (course.check_flip_inference, lambda m, x: (m(x)["out"].softmax(1) + m(x.flip(-1))["out"].softmax(1)) / 2,
     "not flipped back"),
    (course.check_strides_and_dilations, lambda os_: ((1, 2, 2, 2), (1, 1, 1, 1)), "strides"),
    (course.check_strides_and_dilations, lambda os_: (strides_and_dilations(os_)[0],
                                                      tuple(min(d, 2) for d in strides_and_dilations(os_)[1])),
     "multiply"),
    (course.check_bottleneck, lambda c, p, s, d: Bottleneck(c, p, s, d, relu_first=True), "ReLU before the addition"),
    (course.check_bottleneck, lambda c, p, s, d: Bottleneck(c, p, s, d, stride_1x1=True), "first 1x1 conv"),
    (course.check_bottleneck, lambda c, p, s, d: torch.nn.Conv2d(c, 4 * p, 3, s, 1), "state_dict does not fit"),
    (course.check_bin_edges, lambda n, s: [(i * (n // s), (i + 1) * (n // s)) for i in range(s)], "equal bins"),
    (course.check_bin_edges, lambda n, s: [(i * n // s, (i + 1) * n // s) for i in range(s)], "rounded down"),
    (course.check_crop_is_acceptable, lambda m, r: len(m.unique()) > 1 and
     torch.unique(m, return_counts=True)[1].max().item() / m.numel() < r, "255 was counted"),
    (course.check_crop_is_acceptable, lambda m, r: crop_is_acceptable(m, r) or len((m[m != 255]).unique()) == 1,
     "single class"),
    (course.check_hflip_pair, lambda i, m: (i.flip(-1), m), "mask was not flipped"),
    (course.check_hflip_pair, lambda i, m: (i.flip(-2), m.flip(-2)), "upside down"),
    (course.check_ohem_mask, lambda lo, t, th, k: (t != 255) & (lo.softmax(1).gather(
        1, t.masked_fill(t == 255, 0)[:, None]).squeeze(1) < th), "min_kept was not applied"),
    (course.check_epochs_to_iters, lambda e, n, b: e * (n // b), "rounded down"),
    (course.check_epochs_to_iters, lambda e, n, b: max(1, int(n / b + 0.5)), "epochs are missing"),
    (course.check_miou_over_split, lambda pairs, c: sum(iou(confusion_matrix(p, t, c)).nanmean().item()
                                                        for p, t in pairs) / len(pairs), "per-image"),
    (course.check_miou_over_split, lambda pairs, c: iou(sum(confusion_matrix(p, t, c) for p, t in pairs)).nan_to_num(0).mean().item(),
     "absent class counted as IoU 0"),
    (course.check_sgd_update, lambda p, g, b, lr, m, wd: (p - lr * (m * b + g) - lr * wd * p, m * b + g), "weight decay is missing"),
    (course.check_sgd_update, lambda p, g, b, lr, m, wd: (p - lr * (g + wd * p), m * b + g + wd * p), "gradient, not the momentum"),
    (course.check_slide_inference, lambda m, x, c, s: m(x)["out"], "differ|divided|padded"),
    (course.check_slide_inference, lambda m, x, c, s: slide_inference(m, x, c, s).softmax(1), "probabilities"),
    (course.check_fuse_and_classify, lambda outs, h: h.classifier(h.fuse(torch.cat(
        [outs[0]] + [F.interpolate(o, outs[0].shape[-2:], mode="bilinear", align_corners=True) for o in outs[1:]], 1))),
     "align_corners=True"),
    (course.check_fuse_and_classify, lambda outs, h: h.classifier(h.fuse(torch.cat(outs, 1))), "upsample every level"),
    (course.check_multiscale_flip, lambda m, x, sc, o: torch.stack([
        resize(m(resize(x, (int(x.shape[-2] * s), int(x.shape[-1] * s))))["out"], o).softmax(1) for s in sc]
        + [resize(m(resize(x, (int(x.shape[-2] * s), int(x.shape[-1] * s))).flip(-1))["out"].flip(-1), o).softmax(1)
           for s in sc]).mean(0), "truncated"),
    (course.check_multiscale_flip, lambda m, x, sc, o: multiscale_flip(m, x, sc, o).log(), "differ"),
    (course.check_laterals, lambda feats, h: [conv(f) for conv, f in zip(h.lateral_convs, feats[:-1])], "list of 4"),
    (course.check_weighted_cross_entropy, lambda lo, t, w: F.cross_entropy(lo, t, weight=w, ignore_index=255), "NaN for"),
    (course.check_weighted_cross_entropy, lambda lo, t, w: F.cross_entropy(lo, t, weight=w, ignore_index=255,
                                                                          reduction="sum") / (t != 255).sum().clamp(min=1),
     "number of valid pixels"),
    (course.check_ppm_parameters, lambda cin, c, s: len(s) * cin * c + (cin + len(s) * c) * c * 9, "BatchNorm"),
    (course.check_ppm_parameters, lambda cin, c, s: len(s) * (cin * c + 2 * c) + len(s) * c * c * 9 + 2 * c, "C5 itself"),
    (course.check_training_step, _step_with(train=False), "eval mode.*model.train"),
    (course.check_training_step, _step_with(aux=0.0), "auxiliary loss is missing"),
    (course.check_training_step, _step_with(aux=1.0), "auxiliary loss has weight 1"),
    (course.check_training_step, _step_with(decay=False), "weight decay is missing"),
    (course.check_training_step, _step_with(zero_grad=False), "gradients accumulate.*step 2"),
    (course.check_training_step, _step_with(keep=False), "momentum buffers were not kept"),
    (course.check_training_step, _step_with(poly=False), "base lr.*poly lr"),
    (course.check_training_step, _step_with(no_grad=False), "raised RuntimeError.*torch.no_grad"),
    (course.check_training_step, _step_with(in_place=False), "parameters did not change"),
    (course.check_training_step, _step_with(loss=lambda lo, t: F.cross_entropy(lo, t, ignore_index=255)),
     "NaN loss.*all ignored"),
    (course.check_training_step, lambda *args: None if training_step(*args) else None, "expected the loss"),
    (course.check_lr_curve, _curve_with(per_epoch=True), "once per epoch"),
    (course.check_lr_curve, _curve_with(late=1), "one iteration late"),
    (course.check_lr_curve, _curve_with(extra=1), "one value too many"),
    (course.check_lr_curve, _curve_with(warmup=False), "warmup is missing"),
    (course.check_lr_curve, _curve_with(restart=True), "new schedule from the resume point"),
    (course.check_lr_curve, _curve_with(from_zero=True), "start at iteration 0"),
    (course.check_lr_curve, lambda tc, start: [(tc.lr - tc.min_lr) * (1 - it / tc.max_iters) ** tc.lr_power + tc.min_lr
                                               for it in range(start, tc.max_iters + 2)], "complex"),
    (course.check_lr_curve, lambda tc, start: {it: 0.01 for it in range(start, tc.max_iters)}, "expected a list"),
]


@pytest.mark.parametrize("checker, answer, words", WRONG, ids=[c.__name__ for c, _, _ in WRONG])
def test_a_wrong_answer_is_explained(checker, answer, words):
    with pytest.raises(course.ExerciseError, match=words) as caught:
        checker(answer)
    assert "nan" not in str(caught.value).replace("NaN", "")  # never 'largest difference nan'
    assert "\n" not in str(caught.value)  # one line


def _cheats():
    """One call to the package per exercise: each must fail with 'write it yourself'."""
    from upernet_ref.configs import TestConfig
    from upernet_ref.data import transforms as T
    from upernet_ref.evaluation import inference, metrics
    from upernet_ref.model.head import UPerHead
    from upernet_ref.training import losses, schedule
    from upernet_ref.configs import TrainConfig
    from upernet_ref.model.backbone import STRIDES_DILATIONS
    from upernet_ref.perf import late_upsampling as late

    def top_down_cheat(ls):
        head = UPerHead([4, 4, 4, 4], 4, 2)
        return UPerHead.fpn_features(head, ls)

    return [
        (course.check_ppm, lambda x, m: m(x)),
        (course.check_top_down, top_down_cheat),
        (course.check_rescale_size, lambda h, w, s: T.rescale_size(h, w, s)),
        (course.check_cross_entropy, lambda lo, t: losses.cross_entropy(lo, t)),
        (course.check_poly_lr, lambda *a: schedule.poly_lr(*a)),
        (course.check_confusion_matrix, lambda p, t, c: metrics.confusion_matrix(p, t, c)),
        (course.check_iou, lambda m: torch.tensor(metrics.summarize(m)["iou"])),
        (course.check_segmentation_loss, lambda o, t: losses.segmentation_loss(o, t, TrainConfig())[0]),
        (course.check_flip_inference, lambda m, x: inference.inference(m, x, TestConfig(mode="whole", flip=True))),
        (course.check_bottleneck, lambda c, p, s, d: _PackageBlock(c, p, s, d)),
        (course.check_strides_and_dilations, lambda os_: STRIDES_DILATIONS[os_]),
        (course.check_ohem_mask, lambda lo, t, th, k: losses.ohem_mask(lo, t, th, k)),
        (course.check_epochs_to_iters, lambda e, n, b: schedule.epochs_to_iters(e, n, b)),
        (course.check_miou_over_split, lambda pairs, c: metrics.summarize(
            sum(metrics.confusion_matrix(p, t, c) for p, t in pairs))["miou"]),
        (course.check_slide_inference, lambda m, x, c, s: inference.slide_inference(m, x, c, s)),
        (course.check_crop_is_acceptable, lambda m, r: T.random_crop(torch.zeros(3, *m.shape), m, m.shape, r) and True),
        (course.check_hflip_pair, lambda i, m: T.random_hflip(i, m, p=1.0)),
        (course.check_fuse_and_classify, lambda outs, h: UPerHead.forward(h, [torch.zeros(2, 4, 8, 8)] * 4)),
        # the fast path's late-upsampling fusion (perf/late_upsampling.py) is the package's too
        (course.check_ppm, lambda x, m: m.bottleneck.relu(m.bottleneck.bn(late.conv_of_resized(
            m.bottleneck.conv, [x] + [b(F.adaptive_avg_pool2d(x, s)) for s, b in zip(m.pool_scales, m.branches)],
            x.shape[-2:])))),
        (course.check_fuse_and_classify, lambda outs, h: h.classifier(h.dropout(h.fuse.relu(h.fuse.bn(
            late.conv_of_resized(h.fuse.conv, outs, outs[0].shape[-2:])))))),
        (course.check_laterals, lambda feats, h: h.fpn_features(feats)),
        (course.check_weighted_cross_entropy, lambda lo, t, w: losses.cross_entropy(lo, t, class_weights=w)),
        (course.check_multiscale_flip, lambda m, x, sc, o: inference.inference(
            m, x, TestConfig(mode="whole", scales=sc, flip=True), o)),
        (course.check_training_step, _train_step_cheat),
        (course.check_training_step, _sgd_cheat),
        (course.check_training_step, lambda m, x, y, b, it, tc: losses.segmentation_loss(m.train()(x), y, tc)[0]),
        (course.check_lr_curve, lambda tc, start: [schedule.poly_lr(it, tc.max_iters, tc.lr, tc.min_lr, tc.lr_power,
                                                                    tc.warmup_iters, tc.warmup_ratio)
                                                   for it in range(start, tc.max_iters)]),
        (course.check_lr_curve, _poly_lr_scheduler_cheat),
    ]


def _poly_lr_scheduler_cheat(tc, start):
    from upernet_ref.training.schedule import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    scheduler, lrs = build_scheduler(optimizer, tc), []
    for it in range(tc.max_iters):
        if it >= start:
            lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs


def _train_step_cheat(model, images, masks, buffers, it, tc):
    from upernet_ref.configs import get_config
    from upernet_ref.training.trainer import train_step

    optimizer = torch.optim.SGD(model.parameters(), tc.lr, tc.momentum, weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_step(model.train(), (images, masks), optimizer, scaler, get_config("upernet_small_demo")).loss


def _sgd_cheat(model, images, masks, buffers, it, tc):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), tc.lr, tc.momentum, weight_decay=tc.weight_decay)
    outputs = model(images)
    loss = cross_entropy(outputs["out"], masks) + 0.4 * cross_entropy(outputs["aux"], masks)
    loss.backward()
    optimizer.step()
    return loss.item()


class _PackageBlock(torch.nn.Module):
    """The package's Bottleneck, wrapped so its names fit: its forward is what the cheat calls."""

    def __init__(self, c, p, s, d):
        super().__init__()
        from upernet_ref.model.backbone import Bottleneck as Package
        down = (torch.nn.Sequential(torch.nn.Conv2d(c, 4 * p, 1, s, bias=False), torch.nn.BatchNorm2d(4 * p))
                if s != 1 or c != 4 * p else None)
        self.block = Package(c, p, s, d, down)

    def state_dict(self, *args, **kwargs):
        return self.block.state_dict(*args, **kwargs)

    def load_state_dict(self, state, *args, **kwargs):
        return self.block.load_state_dict(state, *args, **kwargs)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("index", range(len(_cheats())))
def test_a_package_call_is_refused(index):
    checker, cheat = _cheats()[index]
    with pytest.raises(course.ExerciseError, match="write it yourself|emptied"):
        checker(cheat)


def test_blocking_is_undone_after_the_check():
    from upernet_ref.training import schedule

    with pytest.raises(course.WriteItYourself):
        course.check_poly_lr(lambda *a: schedule.poly_lr(*a))
    assert schedule.poly_lr(0, 10, 0.01, 0.0, 1.0, 0, 0.1) == pytest.approx(0.01)
    with course.blocked(schedule.poly_lr):
        with pytest.raises(course.WriteItYourself, match="upernet_ref.training.schedule.poly_lr"):
            schedule.poly_lr(0, 10, 0.01)
    assert schedule.poly_lr(0, 10, 0.01, 0.0, 1.0, 0, 0.1) == pytest.approx(0.01)


def test_a_hard_coded_answer_fails():
    with pytest.raises(course.ExerciseError):
        course.check_iou(lambda m: torch.tensor([50 / 60, 30 / 36, 10 / 14, float("nan")], dtype=torch.float64))
    with pytest.raises(course.ExerciseError):
        course.check_flip_inference(lambda m, x: torch.full((1, 3, 10, 14), 1 / 3))


def test_an_exception_names_the_case_and_the_answer_line():
    def answer(h, w, scale):
        return h // 0, w

    with pytest.raises(course.ExerciseError) as caught:
        course.check_rescale_size(answer)
    message = str(caught.value)
    assert message.startswith("rescale_size raised ZeroDivisionError")
    assert "for a 512x683 image into scale (2048, 512)" in message and "return h // 0, w" in message
    assert caught.value.__suppress_context__


def test_the_private_references_equal_the_package():
    """The checkers' own references (not the package) give the package's results."""
    from upernet_ref.data import transforms as T
    from upernet_ref.evaluation import metrics
    from upernet_ref.course import randomize_batchnorm
    from upernet_ref.model.ppm import PyramidPooling
    from upernet_ref.training import losses, schedule

    gen = torch.Generator().manual_seed(0)
    for h, w, scale in ((512, 683, (2048, 512)), (13, 20, (10, 6.5)), (100, 1000, (2048, 512)), (37, 91, (300, 77))):
        assert course._ref_rescale_size(h, w, scale) == T.rescale_size(h, w, scale)
    for args in ((0, 100, 0.01, 1e-4, 0.9, 10, 0.1), (55, 100, 0.01, 0.0, 1.0, 0, 0.1), (120, 100, 0.02, 1e-4, 0.9, 0, 0.5)):
        assert course._ref_poly_lr(*args) == pytest.approx(schedule.poly_lr(*args), rel=1e-12)
    logits, target = torch.randn(2, 4, 5, 6, generator=gen), torch.randint(0, 4, (2, 5, 6), generator=gen)
    target[0, 0] = 255
    torch.testing.assert_close(course._ref_cross_entropy(logits, target).float(), losses.cross_entropy(logits, target))
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    torch.testing.assert_close(course._ref_weighted_ce(logits, target, weights).float(),
                               losses.cross_entropy(logits, target, class_weights=weights))
    pred = torch.randint(0, 5, (2, 5, 6), generator=gen)
    assert torch.equal(course._ref_confusion_matrix(pred, target, 5), metrics.confusion_matrix(pred, target, 5))
    matrix = torch.randint(0, 9, (5, 5), generator=gen)
    matrix[4] = 0
    matrix[:, 4] = 0
    torch.testing.assert_close(course._ref_iou(matrix), torch.tensor(metrics.summarize(matrix)["iou"], dtype=torch.float64),
                               equal_nan=True)
    ppm = randomize_batchnorm(PyramidPooling(6, 3)).eval()
    x = torch.randn(2, 6, 9, 7, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(course._ref_ppm(x, ppm.state_dict(), ppm.pool_scales), ppm(x), rtol=1e-4, atol=1e-5)
    levels = [torch.randn(1, 2, s, s, generator=gen) for s in (16, 8, 4, 2)]
    expected = list(levels)
    for i in range(3, 0, -1):
        expected[i - 1] = expected[i - 1] + resize(expected[i], expected[i - 1].shape[-2:])
    for a, b in zip(course._ref_top_down(levels), expected):
        torch.testing.assert_close(a, b)


def test_an_unsolved_exercise_raises_not_implemented():
    def unsolved(*args):
        raise NotImplementedError("exercise")

    with pytest.raises(NotImplementedError):
        course.check_poly_lr(unsolved)


def test_compare_names_type_shape_and_value():
    with pytest.raises(course.ExerciseError, match="expected a torch.float32 tensor of shape"):
        course.compare("x", 1.0, torch.zeros(2))
    with pytest.raises(course.ExerciseError, match=r"shape \(3,\)"):
        course.compare("x", torch.zeros(3), torch.zeros(2))
    with pytest.raises(course.ExerciseError, match=r"1 of 2 values differ.*index \(1,\)"):
        course.compare("x", torch.tensor([0.0, 1.0]), torch.zeros(2))
    course.compare("x", torch.tensor([0.0, 1e-9]), torch.zeros(2))
    with pytest.raises(course.ExerciseError, match=r"x: NaN at index \(1,\)"):
        course.compare("x", torch.tensor([0.0, float("nan")]), torch.zeros(2))
    with pytest.raises(course.ExerciseError, match=r"x: a number at index \(0,\).*expected nan"):
        course.compare("x", torch.tensor([0.0, 1.0]), torch.tensor([float("nan"), 1.0]))
    course.compare("x", torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))


def test_demo_checkpoint_is_hash_checked(tmp_path):
    model = torch.nn.Linear(2, 2)
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in torch.nn.Linear(2, 2).state_dict().items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    course.load_demo_checkpoint(model, path, digest)
    torch.testing.assert_close(model.weight, __import__("safetensors.torch").torch.load_file(str(path))["weight"])
    with pytest.raises(ValueError, match="SHA-256"):
        course.load_demo_checkpoint(model, path, "0" * 64)
    with pytest.raises(FileNotFoundError, match="make_demo_checkpoint"):
        course.load_demo_checkpoint(model, tmp_path / "missing.safetensors", digest)


def test_the_committed_demo_checkpoint_loads():
    from upernet_ref.model.upernet import build_model

    assert course.DEMO_CHECKPOINT.stat().st_size < 8e6
    course.load_demo_checkpoint(build_model("upernet_small_demo"))


def test_exact_comparisons_switches_tf32_off():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        course.exact_comparisons()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert course.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_lr_curve_reference_equals_polylr():
    """`_ref_lr_curve` (the checker's own curve) == the lrs `PolyLR` gives the optimiser, resumed too."""
    from upernet_ref.training.schedule import build_scheduler

    for tc, start, _ in course._lr_curve_cases():
        if tc.max_iters > 1000:
            continue  # the published schedules: the same code, longer
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
        scheduler, used = build_scheduler(optimizer, tc), []
        for _ in range(tc.max_iters):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        torch.testing.assert_close(course._ref_lr_curve(tc, start), torch.tensor(used[start:], dtype=torch.float64),
                                   rtol=1e-12, atol=0)


def test_the_training_step_reference_equals_the_package():
    """`_ref_training_steps` (the checker's own step) == `trainer.train_step` + `build_optimizer` + `PolyLR`."""
    from upernet_ref import configs
    from upernet_ref.training.schedule import build_optimizer, build_scheduler
    from upernet_ref.training.trainer import train_step

    for model, batches, buffers, start, tc, _ in course._training_step_cases():
        if start or any(b.any() for b in buffers):
            continue  # the package's optimizer starts at iteration 0 with empty buffers
        cfg = configs.override(configs.get_config("upernet_small_demo"),
                               {"train.epochs": tc.epochs, "train.iters_per_epoch": tc.iters_per_epoch})
        expected = course._ref_training_steps(model, batches, buffers, start, cfg.train)
        optimizer = build_optimizer(model.train(), cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        for (images, masks), want in zip(batches, expected):
            loss = train_step(model, (images, masks), optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg).loss
            scheduler.step()
            momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
            got = course._step_outcome(model, momentum, loss)
            for name in want:  # the package's cross-entropy is float32, the reference's float64
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
