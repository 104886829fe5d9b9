"""BatchNorm folding is exact, and the fast inference path agrees with fp32 eager (issue 6)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from upernet_ref import build_model, configs
from upernet_ref.perf import fast as fast_module
from upernet_ref.perf.fast import (BF16_FLOAT32_MODULES, CPU_COMPILE_AFTER_S, Float32,
                                   compile_rule, count_batchnorms, cuda_autocast_dtype,
                                   default_fast_settings, fast_inference_model, fold_batchnorm,
                                   fold_conv_bn, keep_float32)
from upernet_ref.demo_scenes import DemoScenes

from shared_paths import REALDATA
CFG = configs.get_config("upernet_small_demo")
MEAN = torch.tensor(CFG.data.mean).view(1, 3, 1, 1)
STD = torch.tensor(CFG.data.std).view(1, 3, 1, 1)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() - MEAN) / STD


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """Seeded random weights, random BN affine, and BN statistics from train-mode forwards.

    With fresh BatchNorms (mean 0, var 1, gamma 1, beta 0) folding is nearly the identity and
    a wrong fold could pass; here every BN is a non-trivial affine map.
    """
    torch.manual_seed(0)
    net = build_model(CFG)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.momentum = 0.5
    net.train()
    scenes = DemoScenes("train", num_samples=8, size=(64, 64), seed=1)
    batch = torch.stack([scenes[i][0] for i in range(8)])
    with torch.no_grad():
        for _ in range(3):
            net(normalize(batch))
    return net.eval()


def test_fold_conv_bn_matches_conv_then_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_removes_every_bn_and_is_exact(model):
    folded = fold_batchnorm(model)
    assert count_batchnorms(model) > 20  # the original is untouched
    assert count_batchnorms(folded) == 0
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x)["out"], folded(x)["out"]
    assert expected.abs().max() > 0.1  # logits are not trivially small
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fast_model_float32_is_exact_and_returns_float32(model):
    fast = fast_inference_model(model, "cpu", dtype=None, compile=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = fast(x)["out"]
        expected = model(x)["out"]
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_default_settings_are_documented_rules():
    cpu = default_fast_settings("cpu")
    assert cpu.channels_last
    assert cpu.dtype in (None, torch.bfloat16)
    assert cpu.float32_modules == (BF16_FLOAT32_MODULES if cpu.dtype is not None else ())
    compiles, why = compile_rule("cpu")
    assert cpu.compile == cpu.freezing == compiles and why
    assert cpu.compile_after_s == (CPU_COMPILE_AFTER_S if compiles else 0.0)
    assert cpu.train_overrides()["train.compile"] is False  # measured slower on the CPU


def test_compile_rule_needs_a_cpp_compiler_and_an_x86_vector_unit(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(fast_module, "cpp_compiler", lambda: None)
    assert compile_rule("cpu") == (False, "no C++ compiler on PATH (g++/c++/clang++): "
                                          "inductor cannot build kernels")
    monkeypatch.setattr(fast_module, "cpp_compiler", lambda: "/usr/bin/g++")
    assert compile_rule("cpu")[0] is True
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert compile_rule("cpu")[0] is False
    assert default_fast_settings("cpu").compile is False
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert compile_rule("cpu")[0] is True and "freezing" in compile_rule("cpu")[1]


def test_cuda_dtype_is_bf16_only_with_bf16_tensor_cores():
    # torch.cuda.is_bf16_supported() also says True on a V100 / T4, where bf16 is emulated
    assert cuda_autocast_dtype((9, 0)) == cuda_autocast_dtype((8, 6)) == torch.bfloat16  # H100, A10
    assert cuda_autocast_dtype((7, 0)) == cuda_autocast_dtype((7, 5)) == torch.float16  # V100, T4


def _broken_compile(error: Exception):
    def compile(model, **kwargs):
        def run(*args):
            raise error
        return run
    return compile


def test_fast_model_runs_uncompiled_when_compile_fails(model, monkeypatch):
    """E.g. a GPU machine without Triton or a C compiler: a warning, not a crash."""
    monkeypatch.setattr(torch, "compile", _broken_compile(RuntimeError("no C compiler\n...")))
    fast = fast_inference_model(model, "cpu", dtype=None, compile=True, compile_after_s=0)
    assert fast.settings.compile and fast.compile_error is None
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = fast(x)["out"]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x)["out"], atol=1e-4, rtol=1e-4)
    assert fast.compile_error == "RuntimeError: no C compiler"
    assert not fast.settings.compile and "torch.compile" not in fast.settings.describe()
    fast(x)  # from now on uncompiled, no second warning needed


def test_fast_model_does_not_hide_out_of_memory(model, monkeypatch):
    monkeypatch.setattr(torch, "compile", _broken_compile(torch.cuda.OutOfMemoryError("OOM")))
    fast = fast_inference_model(model, "cpu", dtype=None, compile=True, compile_after_s=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fast(torch.randn(1, 3, 64, 64))
    assert fast.compile_error is None


def _counting_compile(calls: list, extra_cpu_s: float = 0.0):
    """A stand-in for torch.compile: runs the model, records each call's input shape, and
    optionally burns `extra_cpu_s` of CPU time (a compiled shape that is slower)."""
    def compile(model, **kwargs):
        assert kwargs.get("dynamic") is False  # one static graph per shape

        def run(images):
            import torch._inductor.config
            compiling = tuple(images.shape) not in calls
            calls.append(tuple(images.shape))
            assert torch._inductor.config.freezing == compiling  # only while compiling
            end = time.process_time() + extra_cpu_s
            while time.process_time() < end:
                pass
            return model(images)
        return run
    return compile


def test_a_shape_is_compiled_once_its_uncompiled_calls_cost_a_compile(model, monkeypatch):
    """Rent, then buy: no compile for the first calls of a shape, nor ever for a shape whose
    uncompiled calls stay cheap; at most MAX_COMPILED_SHAPES shapes."""
    calls: list = []
    monkeypatch.setattr(torch, "compile", _counting_compile(calls))
    x = torch.randn(1, 3, 32, 32)
    never = fast_inference_model(model, "cpu", dtype=None, compile=True, compile_after_s=1e9)
    for _ in range(3):
        never(x)
    assert calls == [] and never.compiled_shapes == [] and never.compile_s == 0.0
    assert never.uncompiled_s[(1, 3, 32, 32)] > 0
    soon = fast_inference_model(model, "cpu", dtype=None, compile=True, compile_after_s=1e-9)
    soon(x)  # uncompiled: nothing was spent on this shape yet
    assert calls == []
    out = soon(x)["out"]  # now compiled
    assert calls == [(1, 3, 32, 32)] and soon.compiled_shapes == [(1, 3, 32, 32)]
    assert soon.compile_s > 0 and "torch.compile with freezing" in soon.settings.describe()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x)["out"], atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(fast_module, "MAX_COMPILED_SHAPES", 2)
    for size in (40, 48, 56):
        y = torch.randn(1, 3, size, size)
        soon(y), soon(y)
    assert soon.compiled_shapes == [(1, 3, 32, 32), (1, 3, 40, 40)]  # 48, 56: uncompiled
    assert calls.count((1, 3, 48, 48)) == calls.count((1, 3, 56, 56)) == 0


def test_a_compiled_shape_that_is_slower_goes_back_to_uncompiled(model, monkeypatch):
    calls: list = []
    monkeypatch.setattr(torch, "compile", _counting_compile(calls, extra_cpu_s=0.3))
    fast = fast_inference_model(model, "cpu", dtype=None, compile=True, compile_after_s=1e-9)
    x = torch.randn(1, 3, 32, 32)
    for _ in range(5):  # uncompiled, compiling, 2 compiled (slower), uncompiled again
        fast(x)
    assert fast.slower_shapes == [(1, 3, 32, 32)] and len(calls) == 3


@pytest.mark.slow
def test_compiled_fast_path_with_freezing_agrees_with_eager(trained):
    """The real inductor CPU path (freezing, bf16 where native): the trained demo checkpoint's
    argmax on demo val images as fp32 eager's on >= 99.9% of the pixels."""
    if not compile_rule("cpu")[0]:
        pytest.skip(compile_rule("cpu")[1])
    images = demo_images(n=4, size=(64, 96))
    fast = fast_inference_model(trained, "cpu", compile=True, compile_after_s=0)
    result = agreement(trained, fast, images)
    assert fast.compiled_shapes == [tuple(images.shape)] and fast.compile_error is None
    assert result["all"] >= 0.999 and result["max_abs_diff"] > 0


def test_keep_float32_runs_the_module_in_float32_under_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        keep_float32(net, ["1"])
        assert isinstance(net[1], Float32) and not isinstance(net[0], Float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inner = net[1](net[0](x))  # conv 0 in bf16, conv 1 in float32
            alone = net[1](x.new_ones(1, 4, 6, 6).bfloat16())
    assert inner.dtype == torch.float32 and alone.dtype == torch.float32
    torch.testing.assert_close(inner, expected, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        keep_float32(net, ["nope"])


def test_fast_model_keeps_the_default_modules_in_float32(model):
    fast = fast_inference_model(model, "cpu", dtype=torch.bfloat16, compile=False)
    wrapped = {name for name, m in fast.model.named_modules() if isinstance(m, Float32)}
    assert wrapped == {"backbone.stem", "backbone.layer1", "backbone.layer2",
                       "decode_head.classifier"}  # no "backbone.conv1": a deep stem, skipped
    assert "float32: backbone.stem" in fast.settings.describe()
    plain = fast_inference_model(model, "cpu", dtype=torch.bfloat16, float32_modules=())
    assert not any(isinstance(m, Float32) for m in plain.model.modules())
    with pytest.raises(ValueError, match="no submodule"):
        fast_inference_model(model, "cpu", dtype=torch.bfloat16, float32_modules=["backbone.x"])


def agreement(model: nn.Module, fast: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Argmax agreement overall and on "decided" pixels, and the logit error, vs fp32 eager.

    A pixel is decided when its fp32 top-1 / top-2 logit margin exceeds 5% of the logits'
    standard deviation. A seeded random network has many near-ties (margins far below bf16's
    ~3 significant digits), where bf16 legitimately flips the argmax; a trained network has few.
    """
    with torch.no_grad():
        a = model(images)["out"]
        b = fast(images)["out"]
    top2 = a.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.05 * a.std()
    same = a.argmax(1) == b.argmax(1)
    return {"all": same.float().mean().item(), "decided": same[decided].float().mean().item(),
            "decided_fraction": decided.float().mean().item(),
            "max_abs_diff": (a - b).abs().max().item(), "logit_std": a.std().item()}


def demo_images(n: int = 4, size: tuple[int, int] = (96, 128)) -> torch.Tensor:
    scenes = DemoScenes("val", num_samples=n, size=size, seed=0)
    return normalize(torch.stack([scenes[i][0] for i in range(n)]))


def real_images(per_dataset: int = 4, size: tuple[int, int] = (192, 256)) -> torch.Tensor:
    """ADE20K, VOC val and Cityscapes images from shared/realdata (skip when absent)."""
    voc = REALDATA / "voc/VOCdevkit/VOC2012"
    folders = [REALDATA / "ade20k/ADEChallengeData2016/images", voc / "JPEGImages",
               REALDATA / "cityscapes/leftImg8bit"]
    for folder in folders:
        if not folder.is_dir():
            pytest.skip(f"{folder} is absent")
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[:per_dataset]
    paths = (sorted(folders[0].rglob("*.jpg"))[:per_dataset]
             + [folders[1] / f"{i}.jpg" for i in ids]
             + sorted(folders[2].rglob("*.png"))[:per_dataset])
    arrays = [np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.BILINEAR))
              for p in paths]
    return normalize(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("source", ["demo", "real"])
def test_fp32_fast_path_agrees(model, source):
    images = demo_images() if source == "demo" else real_images(per_dataset=1)
    fast = fast_inference_model(model, "cpu", dtype=None, compile=False)
    assert agreement(model, fast, images)["all"] >= 0.999


@pytest.mark.parametrize("source", ["demo", "real"])
def test_bf16_fast_path_on_a_random_network(model, source):
    """Random weights: the logits are near-ties on many pixels (~9% within 5% of the logit std
    on real images), which bf16 legitimately flips, so only decided pixels must agree; the
    strict 99.9% target is checked on a trained network below."""
    images = demo_images() if source == "demo" else real_images(per_dataset=1)
    fast = fast_inference_model(model, "cpu", dtype=torch.bfloat16, compile=False)
    result = agreement(model, fast, images)
    assert result["max_abs_diff"] < 0.1 * result["logit_std"]  # ~3% measured
    assert result["decided_fraction"] > 0.8
    assert result["decided"] >= 0.999
    assert result["all"] >= 0.98  # ~99.4% measured


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """`upernet_small_demo` trained on the demo data: the course's committed, hash-checked
    checkpoint (900 iterations, demo val mIoU 78.4%), loaded instead of retrained."""
    from upernet_ref.course import load_demo_checkpoint

    return load_demo_checkpoint(build_model(CFG)).eval()


def test_trained_model_bf16_fast_path_agrees_on_real_images(trained):
    """Issue 6: argmax equal to fp32 eager on >= 99.9% of the pixels of real images."""
    images = real_images()  # 4 ADE20K + 4 VOC + 4 Cityscapes, 192x256
    fast = fast_inference_model(trained, "cpu", dtype=torch.bfloat16, compile=False)
    result = agreement(trained, fast, images)
    assert result["max_abs_diff"] > 0  # bf16 really ran
    assert result["all"] >= 0.999


def test_trained_model_bf16_fast_path_agrees_on_demo_val_and_miou_unchanged(trained):
    """Issue 6: >= 99.9% agreement on demo val and the mIoU unchanged to 0.1 point."""
    from upernet_ref.data.transforms import test_transform
    from upernet_ref.evaluation.evaluate import evaluate

    val = DemoScenes("val", num_samples=16, size=tuple(CFG.data.base_scale[::-1]), seed=0)
    fast = fast_inference_model(trained, "cpu", dtype=torch.bfloat16, compile=False)
    images = normalize(torch.stack([val[i][0] for i in range(len(val))]))
    assert agreement(trained, fast, images)["all"] >= 0.999
    val = DemoScenes("val", num_samples=16, size=tuple(CFG.data.base_scale[::-1]), seed=0,
                     transform=test_transform(CFG.data))  # the form evaluate takes
    eager_miou = evaluate(trained, val, CFG, device="cpu", progress=False, num_workers=0)["miou"]
    fast_miou = evaluate(fast, val, CFG, device="cpu", progress=False, num_workers=0)["miou"]
    assert eager_miou > 0.3  # it learned something, so the comparison means something
    assert abs(fast_miou - eager_miou) <= 0.001  # 0.1 mIoU points


@pytest.mark.slow
def test_int8_path_on_the_trained_checkpoint_agrees_and_is_shape_specific(trained):
    """The int8 path (PT2E + inductor's x86 int8 kernels, compiled with freezing) on the trained
    demo checkpoint, calibrated on demo *train* images: its argmax stays close to fp32 eager's
    on demo val (99.7% measured at 96x128, docs/benchmarks.md) without being identical (it
    really rounds to int8); another input shape is refused in one line."""
    pytest.importorskip("torchao")
    from upernet_ref.perf.int8 import int8_inference_model

    size = (64, 96)
    train = DemoScenes("train", num_samples=3, size=size, seed=0)
    calibration = [normalize(train[i][0].unsqueeze(0)) for i in range(len(train))]
    int8 = int8_inference_model(trained, calibration)
    images = demo_images(n=4, size=size)
    with torch.no_grad():
        same = [(int8(x[None])["out"].argmax(1) == trained(x[None])["out"].argmax(1))
                .float().mean().item() for x in images]
    assert int8.compile_s is not None and int8.quantize_s > 0
    assert 0.98 <= sum(same) / len(same) < 1.0
    with pytest.raises(ValueError, match=r"quantized for input shape \[1, 3, 64, 96\]"):
        int8(images)


# --------------------------------------------------------------------------------------------
# The fast training step (`train --fast`): float32 logits, checked against the fp32 eager step

def test_float32_logits_hook_gives_float32_nchw_logits_and_keeps_the_state_dict():
    from upernet_ref.perf.fast import float32_logits
    cfg = NO_DROPOUT
    torch.manual_seed(0)
    plain = build_model(cfg).train().to(memory_format=torch.channels_last)
    hooked = build_model(cfg).train().to(memory_format=torch.channels_last)
    hooked.load_state_dict(plain.state_dict())
    keys = list(hooked.state_dict())
    assert float32_logits(float32_logits(hooked)) is hooked  # twice: one hook
    assert list(hooked.state_dict()) == keys
    assert len(hooked.decode_head.classifier._forward_hooks) == 1
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = hooked(x), plain(x)
    for key in ("out", "aux"):
        assert ref[key].dtype == torch.bfloat16  # without the hook: bf16 full-size logits
        assert out[key].dtype == torch.float32 and out[key].is_contiguous()
        # the same logits, upsampled in float32 instead of rounded to bf16 after it
        torch.testing.assert_close(out[key], ref[key].float(), atol=0.05, rtol=0.02)
    plain.eval(), hooked.eval()
    with torch.no_grad():  # float32: the hook changes nothing
        torch.testing.assert_close(hooked(x)["out"], plain(x)["out"], atol=0, rtol=0)


# Without dropout: its masks are drawn in memory order, so NCHW and channels_last draw others.
NO_DROPOUT = configs.override(configs.get_config("upernet_small_test"), {"model.dropout": 0.0})


def _train_step_and_update(cfg, settings, seed=0):
    """(first-step loss, weight update) of `bench.prepare_training`'s step from seeded weights."""
    from upernet_ref.perf.bench import prepare_training
    torch.manual_seed(seed)
    model = build_model(cfg)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, cfg.model.num_classes, (2, 64, 64), generator=g)
    path, described = prepare_training(model, images, labels, torch.device("cpu"), cfg,
                                       settings=settings)
    path.call()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return described, after - before


def test_fast_training_step_agrees_with_the_float32_eager_step():
    """The `train --fast` step (bf16 autocast, channels_last, float32 logits, channels_last
    conv inputs) from the same
    weights and batch as the fp32 eager step: its loss within 0.1% and its SGD update (all the
    weights) pointing the same way (cosine > 0.9: random weights and labels give small, noisy
    gradients, measured 0.953 in bf16, 1.000 for fp32 channels_last); the float32 logits no
    further from eager than bf16 logits (today's measured 0.9526 vs 0.9529)."""
    import dataclasses
    cfg = NO_DROPOUT
    settings = dataclasses.replace(default_fast_settings("cpu"), dtype=torch.bfloat16,
                                   train_float32_logits=True)
    eager, eager_update = _train_step_and_update(cfg, None)
    assert eager["train_settings"] == "fp32, NCHW"
    errors, cosines = {}, {}
    for float32 in (True, False):
        fast, update = _train_step_and_update(
            cfg, dataclasses.replace(settings, train_float32_logits=float32))
        assert ("logits upsampled in float32" in fast["train_settings"]) is float32
        assert "channels_last conv inputs" in fast["train_settings"]
        errors[float32] = abs(fast["train_first_loss"] - eager["train_first_loss"])
        assert errors[float32] < 1e-3 * eager["train_first_loss"], (float32, errors)
        cosines[float32] = float(torch.nn.functional.cosine_similarity(update, eager_update, dim=0))
        assert cosines[float32] > 0.9, (float32, cosines)
        assert not torch.equal(update, eager_update)  # bf16 really ran
    assert cosines[True] > cosines[False] - 0.01, cosines


def test_channels_last_conv_inputs_reach_every_conv_and_change_no_value():
    """Without the hooks the PPM bottleneck gets an NCHW input (its concatenation) in a
    channels_last model; with them no conv does, and the logits are the same."""
    from upernet_ref.perf.fast import channels_last_conv_inputs
    torch.manual_seed(0)
    model = build_model(NO_DROPOUT).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].is_contiguous(memory_format=torch.channels_last)
        return hook

    def run():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(record(name))  # after ours: sees what the conv gets
        with torch.no_grad():
            return model(x)["out"]

    before = run()
    assert seen.pop("decode_head.ppm.bottleneck.conv") is False
    for m in model.modules():
        m._forward_pre_hooks.clear()
    channels_last_conv_inputs(channels_last_conv_inputs(model))  # twice: one hook each
    assert all(len(m._forward_pre_hooks) == 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    after = run()
    assert seen and all(seen.values())
    torch.testing.assert_close(after, before, atol=0, rtol=0)
