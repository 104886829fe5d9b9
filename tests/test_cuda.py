"""The CUDA code paths (issue 6): model, fast path, bench, trainer, batch probe, evaluation.

Every test here needs a GPU and is skipped without one. On a GPU machine, from the repository
root (`benchmarks/gpu_figures.sh` runs it first):

    python -m pytest -q tests/test_cuda.py

Each test keeps to about a minute on an H100, torch.compile's first calls included. Where a
test compares with float32 it turns TF32 off (`strict_fp32`): PyTorch's default lets cuDNN run
float32 convolutions on TF32 tensor cores (10-bit mantissa), which is not the reference.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from upernet_ref import build_model, configs
from upernet_ref.perf.bench import run_bench
from upernet_ref.checkpoints import read_checkpoint_file
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.perf.fast import cuda_autocast_dtype, fast_inference_model
from upernet_ref.perf.hardware import device_peak_tflops
from upernet_ref.training.losses import segmentation_loss
from upernet_ref.training.runtime import autocast
from upernet_ref.perf.batch_probe import choose_per_device_batch
from upernet_ref.demo_scenes import DemoScenes
from upernet_ref.cli.train import run_training
from upernet_ref.data.transforms import test_transform, train_transform

# The agreement measure, the demo images and the 300-iteration demo model of the CPU tests
# (`trained` is a fixture: here it trains on the GPU, the trainer's default device).
from test_fast_path import CFG as DEMO_CFG, agreement, demo_images, trained  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
SMALL = configs.get_config("upernet_small_test")


@pytest.fixture
def strict_fp32():
    """True float32 convolutions and matmuls (no TF32) for the duration of a test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_torch_compile_works_on_this_machine():
    """If this fails, the machine lacks what torch.compile needs (Triton, a C compiler): the
    fast path then runs uncompiled (`FastModel.compile_error`), and its figures are not the
    compiled ones."""
    fn = torch.compile(lambda x: torch.relu(x) * 2 + 1)
    x = torch.randn(64, 64, device=CUDA)
    torch.testing.assert_close(fn(x), torch.relu(x) * 2 + 1)


@pytest.mark.parametrize("name, size", [("upernet_small_test", (64, 64)),
                                        ("upernet_r50_os8_ade20k", (256, 256))])
@pytest.mark.parametrize("precision", ["fp32", "bf16_channels_last"])
def test_forward_backward_on_cuda(name, size, precision):
    cfg = configs.get_config(name)
    torch.manual_seed(0)
    model = build_model(cfg).to(CUDA).train()
    x = torch.randn(2, 3, *size, device=CUDA)
    y = torch.randint(0, cfg.model.num_classes, (2, *size), device=CUDA)
    y[:, :4] = cfg.data.ignore_index
    amp = "none"
    if precision == "bf16_channels_last":
        amp = "bf16"
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(amp, CUDA):
        out = model(x)
    k = cfg.model.num_classes
    assert out["out"].shape == (2, k, *size) and out["aux"].shape == (2, k, *size)
    assert out["out"].device.type == CUDA.type and torch.isfinite(out["out"]).all()
    loss, parts = segmentation_loss(out, y, cfg.train, cfg.data.ignore_index)
    loss.backward()
    assert math.isfinite(loss.item()) and set(parts) == {"loss_out", "loss_aux"}
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.device.type == CUDA.type, pname
        assert torch.isfinite(p.grad).all(), pname


def test_cuda_matches_cpu_in_float32(strict_fp32):
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)["out"]
        got = copy.deepcopy(model).to(CUDA)(x.to(CUDA))["out"].cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fast_path_agrees_with_float32_eager_on_cuda(trained, strict_fp32):
    """Issue 6 on the GPU: the CUDA `--fast` defaults (BN folded, bf16 with the float32 layers,
    channels_last, torch.compile) keep the argmax of float32 eager and the mIoU."""
    model = copy.deepcopy(trained).to(CUDA).eval()
    fast = fast_inference_model(model, CUDA)
    s = fast.settings
    assert s.dtype == cuda_autocast_dtype(torch.cuda.get_device_capability())  # bf16 on an H100
    assert s.channels_last and s.compile and bool(s.float32_modules) == (s.dtype == torch.bfloat16)
    images = demo_images().to(CUDA)
    result = agreement(model, fast, images)
    assert fast.compile_error is None, fast.compile_error
    assert result["max_abs_diff"] > 0  # reduced precision really ran
    assert result["decided"] >= 0.999, result
    assert result["all"] >= 0.998, result  # 99.95% on CPU for the same kind of model

    val = DemoScenes("val", num_samples=16, size=tuple(DEMO_CFG.data.base_scale[::-1]), seed=0)
    val = DemoScenes("val", num_samples=16, size=tuple(DEMO_CFG.data.base_scale[::-1]), seed=0,
                     transform=test_transform(DEMO_CFG.data))  # the form evaluate takes
    eager_miou = evaluate(model, val, DEMO_CFG, device=CUDA, progress=False, num_workers=0)["miou"]
    fast_miou = evaluate(fast, val, DEMO_CFG, device=CUDA, progress=False, num_workers=0)["miou"]
    assert eager_miou > 0.3
    assert abs(fast_miou - eager_miou) <= 0.001  # 0.1 mIoU points

    fp16 = fast_inference_model(model, CUDA, dtype=torch.float16, compile=False)
    assert agreement(model, fp16, images)["decided"] >= 0.999  # the pre-Ampere default


def test_fast_path_follows_new_input_sizes_on_cuda():
    """eval / predict feed images of many sizes: torch.compile recompiles (then goes dynamic)."""
    torch.manual_seed(0)
    model = build_model(SMALL).to(CUDA).eval()
    fast = fast_inference_model(model, CUDA)
    for size in [(64, 64), (96, 128), (80, 112)]:
        x = torch.randn(1, 3, *size, device=CUDA)
        out = fast(x)["out"]
        assert out.shape == (1, SMALL.model.num_classes, *size) and out.dtype == torch.float32
        assert agreement(model, fast, x)["decided"] >= 0.99  # random weights: many near-ties
    assert fast.compile_error is None, fast.compile_error


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_on_cuda(mode):
    benchmark_before = torch.backends.cudnn.benchmark
    result = run_bench(SMALL, "cuda", batch=2, size=(64, 64), mode=mode, fast=True,
                       warmup=1, repeats=3)
    assert torch.backends.cudnn.benchmark == benchmark_before  # restored
    assert result["errors"] == {}
    machine = result["machine"]
    assert machine["gpu"] and machine["gpu_memory_gb"] > 0
    weights_mb = sum(p.numel() for p in build_model(SMALL).parameters()) * 4 / 2**20
    prefix = "" if mode == "infer" else "train_"
    time_key = "latency_ms" if mode == "infer" else "train_step_ms"
    for figures in (result, result["fast"]):
        assert 0 < figures[time_key] < math.inf
        assert 0 < figures[prefix + "images_per_s"] < math.inf
        assert figures[prefix + "peak_memory_mb"] > weights_mb
        assert figures.get(prefix + "compile_error") is None
    assert result["peak_memory_mb"] > weights_mb
    peak = device_peak_tflops(CUDA)
    if any(name in machine["gpu"] for name in ("H100", "H200", "A100")):
        assert peak is not None  # the GPUs this project expects must be in the table
    if peak is not None:
        assert 0 < result[prefix + "mfu"] < 1
        assert 0 < result["fast"][prefix + "mfu"] < 1
    assert "torch.compile" in (result["fast"].get("settings", "") if mode == "infer"
                               else result["fast"]["train_settings"])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_train_bf16_channels_last_on_cuda(tmp_path, compiled):
    cfg = configs.override(SMALL, {"train.amp": "bf16", "train.channels_last": True,
                                   "train.compile": compiled, "train.val_interval": 0,
                                   "train.checkpoint_interval": 100})
    data = DemoScenes("train", num_samples=16, size=(48, 64), transform=train_transform(cfg.data))
    result = run_training(cfg, out_dir=tmp_path, device="cuda", max_iters=3, validate=False,
                   progress=False, tensorboard=False, handle_signals=False,
                   log=lambda *_: None, train_dataset=data)
    assert result.iteration == 3 and len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses), result.losses
    assert result.per_device_batch in (2, 4)  # chosen by the CUDA memory probe
    ckpt = read_checkpoint_file(result.last_checkpoint)
    assert ckpt["iteration"] == 3
    for key, value in ckpt["model"].items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), key


def test_choose_per_device_batch_on_cuda():
    torch.manual_seed(0)
    model = build_model(SMALL).to(CUDA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state()
    assert choose_per_device_batch(model, SMALL, CUDA, share=4, smallest=2) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN statistics as they were
    assert torch.equal(torch.cuda.get_rng_state(), rng)


def test_choose_per_device_batch_backs_off_on_out_of_memory():
    """R-50 os8 at a 1536x1536 crop needs ~25 GB per image (from the CPU peak at 512x512):
    16 images never fit, the probe must step down to a divisor that does."""
    cfg = configs.override(configs.get_config("upernet_r50_os8_ade20k"),
                           {"data.crop_size": (1536, 1536)})
    model = build_model(cfg).to(CUDA)
    allocated = torch.cuda.memory_allocated()
    benchmark = torch.backends.cudnn.benchmark  # the trainer turns it on; no autotuning here
    torch.backends.cudnn.benchmark = False
    try:
        chosen = choose_per_device_batch(model, cfg, CUDA, share=16, smallest=1)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    assert chosen < 16 and 16 % chosen == 0
    assert torch.cuda.memory_allocated() < allocated + 256 * 2**20  # the probes' memory is freed
    del model
    torch.cuda.empty_cache()


def test_evaluate_on_cuda_equals_cpu(trained, strict_fp32):
    val = DemoScenes("val", num_samples=8, size=tuple(DEMO_CFG.data.base_scale[::-1]), seed=0,
                     transform=test_transform(DEMO_CFG.data))
    cpu = evaluate(copy.deepcopy(trained), val, DEMO_CFG, device="cpu", progress=False,
                   num_workers=0)
    gpu = evaluate(copy.deepcopy(trained), val, DEMO_CFG, device=CUDA, progress=False,
                   num_workers=0)
    assert gpu["pixels"] == cpu["pixels"]
    assert abs(gpu["miou"] - cpu["miou"]) <= 1e-3
    assert abs(gpu["aacc"] - cpu["aacc"]) <= 1e-3


def test_memory_estimate_is_close_to_the_measured_peak():
    """`upernet memory` (fake tensors) against `torch.cuda.max_memory_allocated`: R-50 os8,
    2 images of 512x512, bf16, the second SGD step (momentum allocated)."""
    from upernet_ref.perf.memory import estimate_training_memory
    from upernet_ref.training.schedule import build_optimizer
    cfg = configs.get_config("upernet_r50_os8_ade20k")
    estimate = estimate_training_memory(cfg, 2, (512, 512), "bf16")
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.train)
    x = torch.randn(2, 3, 512, 512, device=device)
    y = torch.randint(0, cfg.data.num_classes, (2, 512, 512), device=device)
    for step in range(2):
        if step == 1:
            torch.cuda.reset_peak_memory_stats(device)
        with autocast("bf16", device):
            out = model(x)
        loss, _ = segmentation_loss(out, y, cfg.train, cfg.data.ignore_index)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    print(f"estimate {estimate.total_mb:.0f} MB, measured {measured:.0f} MB")
    assert 0.6 * measured <= estimate.total_mb <= 1.1 * measured
