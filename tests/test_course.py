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


RIGHT = [(course.check_conv_output_size, conv_output_size), (course.check_ppm, ppm),
         (course.check_top_down, top_down), (course.check_rescale_size, rescale_size),
         (course.check_cross_entropy, cross_entropy), (course.check_poly_lr, poly_lr),
         (course.check_confusion_matrix, confusion_matrix), (course.check_iou, iou),
         (course.check_segmentation_loss, segmentation_loss),
         (course.check_flip_inference, flip_inference)]


@pytest.mark.parametrize("checker, answer", RIGHT, ids=[c.__name__ for c, _ in RIGHT])
def test_a_right_answer_passes(checker, answer, capsys):
    checker(answer)
    assert "correct" in capsys.readouterr().out


WRONG = [
    (course.check_conv_output_size, lambda s, k, st, p, d: (s + 2 * p - k) // st + 1, "dilation=2"),
    (course.check_ppm, lambda x, m: m.bottleneck(torch.cat([x] + [resize(F.adaptive_avg_pool2d(b(x), s), x.shape[-2:])
                                                                for s, b in zip(m.pool_scales, m.branches)], 1)),
     "values differ"),
    (course.check_top_down, lambda ls: ls[:3], "list of 4"),
    (course.check_rescale_size, lambda h, w, s: (int(h * min(s) / min(h, w)), int(w * min(s) / min(h, w))),
     "expected"),
    (course.check_cross_entropy, lambda lo, t: F.cross_entropy(lo, t, ignore_index=255), "not NaN"),
    (course.check_poly_lr, lambda it, T, b, m, p, wi, wr: (b - m) * (1 - min(it, T) / T) ** p + m, "warmup_iters=100"),
    (course.check_confusion_matrix, lambda p, t, c: confusion_matrix(p, t, c).T, "swapped"),
    (course.check_confusion_matrix, lambda p, t, c: torch.bincount(t.flatten().clamp(max=c - 1) * c + p.flatten(),
                                                                   minlength=c * c).reshape(c, c), "values differ"),
    (course.check_iou, lambda m: m.diagonal().double() / m.sum(1).double(), "values differ"),
    (course.check_segmentation_loss, lambda o, t: cross_entropy(o["out"], t) + cross_entropy(o["aux"], t),
     "values differ"),
    (course.check_flip_inference, lambda m, x: m(x)["out"].softmax(1), "values differ"),
    (course.check_flip_inference, lambda m, x: m(x)["out"][0], "shape"),
]


@pytest.mark.parametrize("checker, answer, words", WRONG, ids=[c.__name__ for c, _, _ in WRONG])
def test_a_wrong_answer_is_explained(checker, answer, words):
    with pytest.raises(course.ExerciseError, match=words):
        checker(answer)


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
