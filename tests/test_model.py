"""The network: parameter counts, GMACs, output shapes, strides and dilations."""
import pytest
import torch

from upernet_ref import build_model, count_parameters, get_config
from upernet_ref.model.backbone import ResNet
from upernet_ref.configs import (PUBLISHED, REPORTED_GMACS, REPORTED_PARAMS,
                                 REPORTED_PARAMS_NO_AUX_ADE20K, override)
from upernet_ref.perf.flops import count_macs


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_spec(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(model) == REPORTED_PARAMS[cfg.model.depth][cfg.data.dataset]


@pytest.mark.parametrize("depth", [50, 101])
def test_parameter_counts_without_aux_head(depth):
    cfg = override(get_config(f"upernet_r{depth}_os8_ade20k"), {"model.aux_head": False})
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(model) == REPORTED_PARAMS_NO_AUX_ADE20K[depth]


@pytest.mark.parametrize("depth,output_stride", sorted(REPORTED_GMACS))
def test_gmacs_at_512_match_spec(depth, output_stride):
    eval_gmacs, train_gmacs = REPORTED_GMACS[depth, output_stride]
    with torch.device("meta"):
        model = build_model(f"upernet_r{depth}_os{output_stride}_ade20k")
    if eval_gmacs is not None:
        assert round(count_macs(model.eval(), (512, 512)) / 1e9) == eval_gmacs
    assert round(count_macs(model.train(), (512, 512)) / 1e9) == train_gmacs


@pytest.mark.parametrize("output_stride,sizes", [(8, (16, 8, 8, 8)), (16, (16, 8, 4, 4)),
                                                 (32, (16, 8, 4, 2))])
def test_backbone_stage_sizes(output_stride, sizes):
    with torch.device("meta"):
        net = ResNet(50, output_stride)
        feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    assert tuple(f.shape[-1] for f in feats) == sizes


def test_contract_dilation_os8():
    net = ResNet(50, 8, blocks=(1, 1, 3, 3))
    d3 = [b.conv2.dilation[0] for b in net.layer3]
    d4 = [b.conv2.dilation[0] for b in net.layer4]
    assert d3 == [1, 2, 2] and d4 == [2, 4, 4]
    assert [b.conv2.padding[0] for b in net.layer4] == d4
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer2[0].conv2.stride == (2, 2)


def test_contract_dilation_os16():
    net = ResNet(50, 16, blocks=(1, 1, 2, 3))
    assert [b.conv2.dilation[0] for b in net.layer3] == [1, 1]
    assert [b.conv2.dilation[0] for b in net.layer4] == [1, 2, 2]
    assert net.layer3[0].conv2.stride == (2, 2)


def test_deep_stem_layout():
    net = ResNet(50, 8)
    convs = [m for m in net.stem if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]
    assert all(c.bias is None for c in convs) and convs[0].stride == (2, 2)


def test_forward_outputs_at_input_resolution():
    torch.manual_seed(0)
    model = build_model("upernet_small_test")
    x = torch.randn(2, 3, 45, 61)  # odd size on purpose
    out = model.train()(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 8, 45, 61)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"} and out["out"].shape == (2, 8, 45, 61)
    assert torch.isfinite(out["out"]).all()


def test_no_aux_head_when_disabled():
    model = build_model(override(get_config("upernet_small_test"), {"model.aux_head": False}))
    assert model.aux_head is None
    assert set(model.train()(torch.randn(2, 3, 32, 32))) == {"out"}


def test_build_model_rejects_bad_input():
    with pytest.raises(TypeError):
        build_model(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_stride"):
        ResNet(50, 4)
    with pytest.raises(KeyError, match="valid names"):
        build_model("upernet_r50")


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model("upernet_small_test").train()
    out = model(torch.randn(2, 3, 32, 32))
    (out["out"].mean() + out["aux"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_randomize_batchnorm_makes_every_bn_a_non_trivial_map():
    from upernet_ref.course import randomize_batchnorm
    net = build_model("upernet_small_test")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    assert randomize_batchnorm(net, torch.Generator().manual_seed(0)) is net
    for bn in bns:
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        x = torch.randn(2, bn.num_features, 3, 3)
        assert not torch.allclose(bn.eval()(x), x, atol=1e-3)  # no longer the identity
