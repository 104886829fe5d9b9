"""inference: whole vs sliding window vs multi-scale + flip."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from upernet_ref import build_model
from upernet_ref import configs
from upernet_ref.configs import TestConfig
from upernet_ref.model.head import resize
from upernet_ref.evaluation.inference import inference, slide_inference, window_grid
from upernet_ref.perf.flops import num_forward_passes


class Pointwise(nn.Module):
    """A 1x1 conv: each pixel's logits depend on that pixel only, so any windowing is exact."""

    def __init__(self, num_classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return {"out": self.conv(x)}


class MirrorSymmetric(nn.Module):
    """Convs whose kernels are left-right symmetric: model(flip(x)) == flip(model(x))."""

    def __init__(self, num_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, num_classes, 5, padding=2))
        with torch.no_grad():
            for m in self.convs:
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.convs(x)


@pytest.mark.parametrize("size,crop,stride", [((50, 70), (32, 32), (21, 21)),
                                              ((32, 32), (32, 32), (21, 21)),
                                              ((20, 70), (32, 32), (16, 24))])
def test_window_grid_covers_the_image_and_stays_inside(size, crop, stride):
    windows = window_grid(size, crop, stride)
    covered = torch.zeros(size, dtype=torch.int64)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= size[0] and 0 <= x1 < x2 <= size[1]
        assert y2 - y1 == min(crop[0], size[0]) and x2 - x1 == min(crop[1], size[1])
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    if size == crop:
        assert windows == [(0, size[0], 0, size[1])]


def test_sliding_equals_whole_when_one_window_covers_the_image():
    torch.manual_seed(0)
    model = build_model("upernet_small_test").eval()
    image = torch.randn(1, 3, 32, 32)
    cfg = configs.TestConfig(crop_size=(32, 32), stride=(21, 21))
    whole = inference(model, image, cfg)
    slide = inference(model, image, dataclasses.replace(cfg, mode="slide"))
    torch.testing.assert_close(slide, whole)
    assert tuple(whole.shape) == (1, 8, 32, 32)
    torch.testing.assert_close(whole.sum(1), torch.ones(1, 32, 32))  # probabilities


@pytest.mark.parametrize("size", [(50, 70), (20, 24)])  # overlapping windows; smaller than crop
def test_sliding_is_exact_for_a_pointwise_model(size):
    model = Pointwise()
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = model(image)["out"]
        got = slide_inference(model, image, (32, 32), (21, 21))
    torch.testing.assert_close(got, expected)


def test_flip_tta_of_a_mirror_equivariant_model_equals_plain_inference():
    model = MirrorSymmetric().eval()
    image = torch.randn(1, 3, 24, 40)
    x = image.flip(-1)
    torch.testing.assert_close(model(x), model(image).flip(-1))  # the premise
    plain = inference(model, image, configs.TestConfig())
    flipped = inference(model, image, configs.TestConfig(flip=True))
    torch.testing.assert_close(flipped, plain)
    # a model that is not mirror-symmetric does change with flip TTA (the test can fail)
    with torch.no_grad():
        model.convs[0].weight[..., 0] += 0.5
    assert not torch.allclose(inference(model, image, configs.TestConfig(flip=True)),
                              inference(model, image, configs.TestConfig()))


def test_multiscale_averages_softmax_at_the_output_size():
    model = MirrorSymmetric().eval()
    image = torch.randn(1, 3, 24, 40)
    out_size = (30, 50)
    got = inference(model, image, configs.TestConfig(scales=(0.5, 1.5), flip=True), out_size=out_size)
    views = []
    with torch.no_grad():
        for s in (0.5, 1.5):
            x = resize(image, (int(24 * s + 0.5), int(40 * s + 0.5)))
            for f in (False, True):
                y = model(x.flip(-1)).flip(-1) if f else model(x)
                views.append(resize(y, out_size).softmax(1))
    torch.testing.assert_close(got, torch.stack(views).mean(0))


def test_number_of_forward_passes():
    model = Pointwise()
    image = torch.randn(1, 3, 50, 70)
    cfg = configs.TestConfig(mode="slide", crop_size=(32, 32), stride=(21, 21), scales=(0.5, 1.0),
                     flip=True)
    inference(model, image, cfg)
    # 0.5: 25x35 -> 1 x 2 windows (padded to 32 high); 1.0: 50x70 -> 2 x 3 windows; x2 flip
    assert model.calls == num_forward_passes((50, 70), cfg) == (2 + 6) * 2



@pytest.mark.parametrize("bad, message", [(dict(mode="tiles"), "test.mode"),
                                          (dict(scales=()), "test.scales"),
                                          (dict(scales=(1.0, -0.5)), "test.scales"),
                                          (dict(crop_size=(0, 512)), "test.crop_size"),
                                          (dict(stride=(341,)), "test.stride")])
def test_a_bad_test_protocol_is_refused_when_the_config_is_built(bad, message):
    with pytest.raises(ValueError, match=message):
        configs.TestConfig(**bad)
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=message):  # the same check on the command line's path
        configs.override(configs.get_config("upernet_small_test"), {f"test.{key}": value})


# --------------------------------------------------------------------------------------------
# Bounded memory at any output size (predict_labels)

class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any torch operation creates inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


class ManyClasses(nn.Module):
    """150 classes of logits at the input's size (what UPerNet returns), at no cost."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 150, 3, padding=1)

    def forward(self, x):
        return {"out": self.conv(x) * 4}


def agree_except_near_ties(labels, probs, tol=1e-5):
    top2 = probs.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < tol
    differ = labels != probs.argmax(1)
    assert not (differ & ~near_tie).any(), "the bounded prediction differs away from a near-tie"
    assert differ.float().mean() < 1e-3


@pytest.mark.parametrize("options", [{}, dict(scales=(0.75, 1.5), flip=True),
                                     dict(mode="slide", crop_size=(16, 16), stride=(11, 11))])
def test_large_outputs_are_predicted_in_bounded_memory_with_the_same_labels(options):
    from upernet_ref.evaluation.inference import predict_labels
    model, image = ManyClasses().eval(), torch.randn(1, 3, 24, 32)
    out_size, budget = (96, 128), 2 ** 20   # 150 x 96 x 128 floats: 7.4 MB
    test = TestConfig(**options)
    probs = inference(model, image, test, out_size=out_size)
    assert probs.shape == (1, 150, 96, 128)  # C x H x W: 14.4 GB for a 6000x4000 photo
    with LargestTensor() as bounded:
        labels = predict_labels(model, image, test, out_size=out_size, max_bytes=budget)
    assert bounded.largest <= budget and labels.shape == (1, 96, 128)
    agree_except_near_ties(labels, probs)
    # four times the output size: the same bound (the photo's size does not matter)
    with LargestTensor() as larger:
        predict_labels(model, image, test, out_size=(192, 256), max_bytes=budget)
    assert larger.largest <= budget
    # an output that fits the budget takes the accumulator path: exactly inference's argmax
    small = predict_labels(model, image, test, out_size=(50, 70))
    assert torch.equal(small, inference(model, image, test, out_size=(50, 70)).argmax(1))
