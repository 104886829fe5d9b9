"""Late upsampling (`perf/late_upsampling.py`): the fusion convs computed with the upsampling
after the weights are the same function as the published layers, forward and backward."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upernet_ref import build_model, configs
from upernet_ref.course import randomize_batchnorm
from upernet_ref.model.head import UPerHead
from upernet_ref.model.layers import resize
from upernet_ref.model.ppm import PyramidPooling
from upernet_ref.perf.fast import (default_fast_settings, fast_inference_model,
                                   fast_training_model)
from upernet_ref.perf.flops import count_macs
from upernet_ref.perf.late_upsampling import (LateUpsamplingPPM, LateUpsamplingUPerHead,
                                              conv_of_resized, late_upsampling, shifted_sum)


def as_written(conv: nn.Conv2d, inputs: list[torch.Tensor], size) -> torch.Tensor:
    return conv(torch.cat([resize(x, size) for x in inputs], 1))


def random_inputs(shapes, channels_last=False, requires_grad=False):
    xs = [torch.randn(2, c, h, w, dtype=torch.double) for c, h, w in shapes]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return [x.requires_grad_(requires_grad) for x in xs]


# (kernel, input shapes (C, H, W), output size): the fusion layer at os8 and os16, the PPM with a
# 1x1 branch, an odd size, an input to be downsampled, an input at the size, a 1x1 and a 5x5 conv
CASES = [
    (3, [(4, 12, 10), (3, 6, 5), (2, 6, 5), (3, 6, 5)], (12, 10)),
    (3, [(4, 16, 16), (3, 8, 8), (2, 4, 4), (3, 4, 4)], (16, 16)),
    (3, [(5, 9, 7), (2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 6, 6)], (9, 7)),
    (3, [(3, 7, 9), (2, 11, 13), (2, 7, 9), (3, 4, 5)], (7, 9)),
    (1, [(3, 8, 8), (2, 4, 4)], (8, 8)),
    (5, [(3, 10, 8), (2, 5, 4), (2, 3, 2)], (10, 8)),
    (7, [(2, 3, 5), (2, 2, 2), (3, 1, 3)], (3, 5)),  # taps reaching past a 3-row map
]


@pytest.mark.parametrize("k, shapes, size", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_of_resized_is_the_conv_of_the_concatenation(k, shapes, size, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(sum(c for c, _, _ in shapes), 6, k, padding=k // 2).double()
    xs = random_inputs(shapes, channels_last)
    expected = as_written(conv, xs, size)
    got = conv_of_resized(conv, xs, size)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k, shapes, size", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_of_resized_has_the_same_gradients(k, shapes, size, channels_last):
    torch.manual_seed(1)
    conv = nn.Conv2d(sum(c for c, _, _ in shapes), 5, k, padding=k // 2).double()
    xs = random_inputs(shapes, channels_last, requires_grad=True)
    grad_out = torch.randn(2, 5, *size, dtype=torch.double)
    wrt = [*xs, conv.weight, conv.bias]
    expected = torch.autograd.grad(as_written(conv, xs, size), wrt, grad_out)
    got = torch.autograd.grad(conv_of_resized(conv, xs, size), wrt, grad_out)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-11)


def test_shifted_sum_is_a_conv_with_one_hot_taps_and_passes_gradcheck():
    torch.manual_seed(2)
    k, c = 3, 2
    taps = torch.randn(1, k * k * c, 5, 4, dtype=torch.double, requires_grad=True)
    # the conv whose tap t = (i, j) copies input channel t*c + ch to output channel ch
    weight = torch.zeros(c, k * k * c, k, k, dtype=torch.double)
    for i in range(k):
        for j in range(k):
            for ch in range(c):
                weight[ch, (i * k + j) * c + ch, i, j] = 1
    torch.testing.assert_close(shifted_sum(taps, k), F.conv2d(taps, weight, padding=1),
                               rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: shifted_sum(t, k), (taps,))
    wide = torch.randn(1, 49 * 2, 2, 3, dtype=torch.double, requires_grad=True)  # 7x7 on 2x3
    assert torch.autograd.gradcheck(lambda t: shifted_sum(t, 7), (wide,))


def test_under_autocast_the_taps_are_summed_in_float32():
    """bf16 taps: summed (and returned) in float32, the gradient back in bf16 and the taps'
    layout; the conv's output has the conv's dtype, bf16, as the layer as written."""
    taps = torch.randn(2, 9 * 4, 6, 5).bfloat16().contiguous(memory_format=torch.channels_last)
    taps.requires_grad_()
    out = shifted_sum(taps, 3)
    assert out.dtype == torch.float32
    reference = shifted_sum(taps.detach().double(), 3)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-5)  # no bf16 rounding
    out.sum().backward()
    assert taps.grad.dtype == torch.bfloat16
    assert taps.grad.is_contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    xs = [torch.randn(1, 4, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = conv_of_resized(conv, xs, (8, 8)), as_written(conv, xs, (8, 8))
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("conv", [nn.Conv2d(5, 3, 3, stride=2, padding=1),
                                  nn.Conv2d(5, 3, 3, padding=2, dilation=2),
                                  nn.Conv2d(5, 3, 3, padding=0)])
def test_a_conv_it_is_not_exact_for_is_computed_as_written(conv):
    conv = conv.double()
    xs = random_inputs([(3, 8, 8), (2, 4, 4)])
    torch.testing.assert_close(conv_of_resized(conv, xs, (8, 8)), as_written(conv, xs, (8, 8)),
                               rtol=0, atol=0)


def test_inputs_with_none_at_the_size_are_computed_as_written():
    conv = nn.Conv2d(5, 3, 3, padding=1).double()
    xs = random_inputs([(3, 4, 4), (2, 2, 2)])
    torch.testing.assert_close(conv_of_resized(conv, xs, (8, 8)), as_written(conv, xs, (8, 8)),
                               rtol=0, atol=0)


@pytest.fixture(scope="module")
def demo_model() -> nn.Module:
    torch.manual_seed(0)
    net = build_model(configs.get_config("upernet_small_demo"))
    randomize_batchnorm(net)
    return net.double()


def test_late_upsampling_keeps_the_parameters_and_computes_the_same_logits(demo_model):
    late = late_upsampling(copy.deepcopy(demo_model))
    assert type(late.decode_head) is LateUpsamplingUPerHead
    assert type(late.decode_head.ppm) is LateUpsamplingPPM
    assert isinstance(late.decode_head, UPerHead)
    assert isinstance(late.decode_head.ppm, PyramidPooling)
    before, after = demo_model.state_dict(), late.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(2, 3, 75, 101, dtype=torch.double)
    with torch.no_grad():
        expected, got = demo_model.eval()(x), late.eval()(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-10)


def test_late_upsampling_training_step_has_the_same_loss_and_gradients(demo_model):
    late = late_upsampling(copy.deepcopy(demo_model)).train()
    ref = copy.deepcopy(demo_model).train()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 96, dtype=torch.double)
    losses = []
    for net in (ref, late):
        torch.manual_seed(4)  # the same dropout masks
        out = net(x)
        loss = out["out"].square().mean() + 0.4 * out["aux"].square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    for (name, p), q in zip(ref.named_parameters(), late.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_late_upsampling_leaves_a_wrapped_fusion_layer_alone(demo_model):
    from upernet_ref.perf.fast import keep_float32

    net = keep_float32(copy.deepcopy(demo_model), ["decode_head.fuse"])
    late_upsampling(net)
    assert type(net.decode_head) is UPerHead
    assert type(net.decode_head.ppm) is LateUpsamplingPPM


def test_r50_os8_does_a_third_fewer_macs():
    with torch.device("meta"):
        net = build_model(configs.get_config("upernet_r50_os8_ade20k")).eval()
    before = count_macs(net, (512, 512))
    after = count_macs(late_upsampling(net), (512, 512))
    assert 0.66 < after / before < 0.70  # 397.5 -> 272.0 GMACs


def test_the_cpu_fast_paths_use_it(demo_model):
    settings = default_fast_settings("cpu")
    assert settings.late_upsampling and "late upsampling" in settings.describe()
    model = copy.deepcopy(demo_model).float()
    fast = fast_inference_model(model, "cpu", dtype=None, compile=False)
    assert type(fast.model.decode_head) is LateUpsamplingUPerHead
    plain = fast_inference_model(model, "cpu", dtype=None, compile=False, late_upsampling=False)
    assert type(plain.model.decode_head) is UPerHead
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(fast(x)["out"], plain(x)["out"], rtol=1e-4, atol=1e-4)
    trained, applied = fast_training_model(model, settings, "none", True)
    assert type(trained.decode_head) is LateUpsamplingUPerHead and "late upsampling" in applied
