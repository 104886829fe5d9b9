"""`upernet bench`: the JSON figures exist and are consistent (no timing assertions)."""
from __future__ import annotations

import json

import pytest
import torch

from upernet_ref.perf import bench
from upernet_ref.perf.bench import format_table, model_flops_utilization, run_bench
from upernet_ref.cli.bench import main
from upernet_ref.perf.hardware import PEAK_TFLOPS, cpu_peak_for, peak_tflops_for_name
from upernet_ref.configs import get_config
from upernet_ref.perf.flops import count_macs
from upernet_ref.model import build_model


def test_bench_json_has_the_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--config", "upernet_small_test", "--device", "cpu", "--size", "32x48",
                 "--mode", "both", "--fast", "--compile", "off", "--warmup", "0", "--repeats", "1",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    for key in ("gmacs", "latency_ms", "images_per_s", "train_images_per_s", "peak_memory_mb",
                "device", "machine", "fast"):
        assert result[key] is not None, key
    for key in ("latency_ms", "images_per_s", "train_images_per_s", "speedup", "settings"):
        assert key in result["fast"], key
    assert result["device"] == "cpu" and result["mfu"] is None  # no peak table for CPUs
    assert result["machine"]["torch"] and result["machine"]["threads"] >= 1
    macs = count_macs(build_model("upernet_small_test").eval(), (32, 48))
    assert result["gmacs"] == pytest.approx(macs / 1e9)
    assert result["images_per_s"] == pytest.approx(1000 / result["latency_ms"])
    assert result["train_batch"] == 2  # BatchNorm in train mode needs more than one image
    assert "eager fp32" in capsys.readouterr().out


def test_infer_only_leaves_train_figures_empty():
    result = run_bench(get_config("upernet_small_test"), "cpu", batch=2, size=(32, 32),
                       mode="infer", warmup=0, repeats=1)
    assert result["train_images_per_s"] is None and result["latency_ms"] > 0
    assert "train" not in format_table(result).split("\n", 2)[2]


def test_bad_arguments_are_errors(capsys):
    assert main(["--config", "no_such_config"]) == 2
    with pytest.raises(ValueError, match="repeats"):
        run_bench(get_config("upernet_small_test"), "cpu", repeats=0)


def test_peak_table_has_the_common_gpus():
    names = dict(PEAK_TFLOPS)
    assert names["H100"] == 989.0 and names["A100"] == 312.0 and names["V100"] == 125.0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("Tesla V100-SXM2-32GB", 125.0),
    ("Tesla T4", 65.0),
    ("NVIDIA H20", None),  # not an H200
    ("NVIDIA B200", None),  # not in the table: MFU None unless --peak-tflops
    ("AMD Instinct MI300X", None),
])
def test_peak_tflops_matches_whole_model_names(name, peak):
    assert peak_tflops_for_name(name) == peak


def test_mfu_arithmetic():
    # R-50 os8 512x512: 397.5 GMACs = 795 GFLOP per image; 100 images/s on a 989 TFLOP/s GPU
    assert model_flops_utilization(397.5, 100.0, 989.0) == pytest.approx(795e11 / 989e12)
    assert model_flops_utilization(397.5, 100.0, 989.0, factor=3) == pytest.approx(
        3 * 795e11 / 989e12)
    assert model_flops_utilization(397.5, 100.0, None) is None
    assert model_flops_utilization(397.5, None, 989.0) is None


def test_peak_override_gives_an_mfu_on_any_device():
    result = run_bench(get_config("upernet_small_test"), "cpu", size=(32, 32), warmup=0,
                       repeats=1, peak_tflops=1.0)
    expected = 2 * result["gmacs"] * 1e9 * result["images_per_s"] / 1e12
    assert result["peak_tflops"] == 1.0 and result["mfu"] == pytest.approx(expected)


def test_out_of_memory_is_recorded_and_the_other_phases_still_run(monkeypatch):
    real = bench.prepare_training

    def eager_does_not_fit(*args, **kwargs):
        if kwargs.get("settings") is None:  # the eager step (the fast one gets its settings)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "prepare_training", eager_does_not_fit)
    result = run_bench(get_config("upernet_small_test"), "cpu", size=(32, 32), mode="both",
                       fast=True, warmup=0, repeats=1, compile="off")
    assert set(result["errors"]) == {"train"}
    assert result["errors"]["train"].startswith("CUDA out of memory at batch 2")
    assert result["train_images_per_s"] is None and result["train_mfu"] is None
    assert result["latency_ms"] > 0 and result["fast"]["train_images_per_s"] > 0
    assert "train_speedup" not in result["fast"]
    table = format_table(result)
    assert "CUDA out of memory at batch 2" in table and "fast training speed-up" not in table


def test_eager_and_fast_are_timed_in_turn_and_the_speedup_is_the_median_ratio(monkeypatch):
    """A change of load half-way (round 2 is slow for both) must not decide the speed-up."""
    clock, calls = [0.0], []
    durations = {"eager": [1.0, 5.0, 1.0], "fast": [0.5, 1.0, 0.25]}  # ratios 2, 5, 4

    def path(name):
        def call():
            clock[0] += durations[name][sum(c == name for c in calls)]
            calls.append(name)
        return bench.TimedPath(call)

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    paths = {"infer": path("eager"), "fast_infer": path("fast")}
    cpu = torch.device("cpu")
    bench.measure_interleaved(paths, cpu, 3, bench.MemoryMeter(cpu), {}, batch=1)
    assert calls == ["eager", "fast"] * 3
    assert paths["infer"].walls == [1.0, 5.0, 1.0]
    speedup = bench.paired_speedup(paths["infer"], paths["fast_infer"])
    assert speedup["speedup"] == 4.0 and speedup["speedup_runs"] == [2.0, 5.0, 4.0]


def test_bench_reports_the_interleaved_speedups(tmp_path):
    result = run_bench(get_config("upernet_small_test"), "cpu", size=(32, 32), mode="both",
                       fast=True, warmup=0, repeats=3, compile="off")
    fast = result["fast"]
    assert result["interleaved"] and len(fast["speedup_runs"]) == 3
    assert len(fast["train_speedup_runs"]) == 3 and fast["train_cpu_speedup"] > 0
    assert len(result["runs_ms"]) == len(fast["runs_ms"]) == 3
    table = format_table(result)
    assert "median of 3 interleaved eager/fast rounds" in table and "CPU" in table


def test_training_compile_failure_falls_back_to_uncompiled(monkeypatch):
    """A machine where torch.compile cannot build kernels (no Triton / C compiler)."""

    def broken_compile(model, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: Failed to find C compiler\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    result = run_bench(get_config("upernet_small_test"), "cpu", size=(32, 32), mode="train",
                       fast=True, warmup=0, repeats=1, compile="on")
    fast = result["fast"]
    assert fast["train_compile_error"] == "RuntimeError: InductorError: Failed to find C compiler"
    assert "torch.compile" not in fast["train_settings"] and fast["train_images_per_s"] > 0
    assert "torch.compile failed" in format_table(result)


def test_the_benchmarked_step_is_the_trained_step_with_the_configuration_s_loss(monkeypatch):
    """bench times `trainer.train_step` with the configuration's loss and optimizer: class weights,
    OHEM, the loss weights and data.ignore_index reach the loss; lr, momentum and weight decay
    the SGD."""
    from upernet_ref.configs import override
    from upernet_ref.training import trainer as trainer_mod

    seen = []
    real_loss, real_step = trainer_mod.segmentation_loss, trainer_mod.train_step

    def spy_loss(outputs, target, train_cfg, ignore_index=255):
        seen.append((train_cfg, ignore_index))
        return real_loss(outputs, target, train_cfg, ignore_index)

    optimizers = []

    def spy_step(model, batch, optimizer, scaler, cfg, **kwargs):
        optimizers.append(optimizer)
        return real_step(model, batch, optimizer, scaler, cfg, **kwargs)

    monkeypatch.setattr(trainer_mod, "segmentation_loss", spy_loss)
    monkeypatch.setattr(bench, "train_step", spy_step)
    cfg = override(get_config("upernet_small_test"), {
        "train.ohem": True, "train.class_weights": tuple(float(k + 1) for k in range(8)),
        "train.aux_loss_weight": 0.25, "data.ignore_index": 7, "train.lr": 0.123,
        "train.weight_decay": 0.0})
    result = run_bench(cfg, "cpu", size=(32, 32), mode="train", warmup=0, repeats=2)
    assert result["train_images_per_s"] > 0
    assert len(seen) == 2 and all(c == cfg.train and i == 7 for c, i in seen)
    group = optimizers[0].param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.123, 0.9, 0.0)
    import inspect
    source = inspect.getsource(bench)
    assert "cross_entropy" not in source and "SGD(" not in source  # no copy of the loss or SGD


def test_fast_training_step_is_checked_against_the_eager_one():
    """Both training paths start from the same weights and batch: their first losses are
    reported (`train_first_loss`) and agree; the fast one computes the head's fusion convs
    with late upsampling, upsamples the logits in float32 and gives every conv a channels_last
    input (`fast.fast_training_model`; bf16 autocast forced here on any CPU)."""
    from upernet_ref.configs import override
    cfg = override(get_config("upernet_small_test"), {"model.dropout": 0.0})
    result = run_bench(cfg, "cpu", size=(32, 32), mode="train", fast=True, warmup=0,
                       repeats=1, dtype="bfloat16")
    fast = result["fast"]
    assert fast["train_settings"] == ("bf16 autocast, channels_last, late upsampling, logits "
                                      "upsampled in float32, channels_last conv inputs")
    assert result["train_settings"] == "fp32, NCHW"
    eager_loss, fast_loss = result["train_first_loss"], fast["train_first_loss"]
    assert eager_loss > 0 and fast_loss != eager_loss  # bf16 really ran
    assert abs(fast_loss - eager_loss) < 1e-3 * eager_loss


def test_bench_takes_configuration_overrides(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["--config", "upernet_small_test", "--device", "cpu", "--size", "32x32",
                 "--mode", "train", "--warmup", "0", "--repeats", "1", "--train.amp=bf16",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["train_settings"].startswith("bf16 autocast")


@pytest.mark.parametrize("flags, vendor, family, per_cycle, basis", [
    ({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}, "AuthenticAMD", 26,
     (64, 128, 256), "two 512-bit FMA pipes"),  # Zen 5
    ({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}, "AuthenticAMD", 25,
     (32, 64, 128), "Zen 4"),
    ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"},
     "GenuineIntel", 6, (64, 1024, 2048), "AMX"),
    ({"avx2", "fma"}, "GenuineIntel", 6, (32, 32, 64), "bf16 emulated"),
    (set(), "", None, (8, 8, 16), "SSE"),
])
def test_cpu_peak_estimate_follows_the_vector_features(flags, vendor, family, per_cycle, basis):
    peak = cpu_peak_for(frozenset(flags), vendor, family, 2600.0, cores=2)
    assert (peak.fp32_per_cycle, peak.bf16_per_cycle, peak.int8_per_cycle) == per_cycle
    assert basis in peak.basis
    assert peak.tflops("fp32") == pytest.approx(2 * 2.6 * per_cycle[0] / 1e3)
    assert "estimated" in peak.describe()


@pytest.fixture
def no_compile(monkeypatch):
    """torch.compile as the identity: the compiled paths' bookkeeping without minutes of
    compiling (the real compiled paths are checked in tests/test_fast_path.py)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: lambda *args: model(*args))


def test_cpu_rows_report_the_fraction_of_the_estimated_peak_and_the_compile_cost(no_compile):
    result = run_bench(get_config("upernet_small_test"), "cpu", size=(32, 32), mode="both",
                       fast=True, warmup=0, repeats=1, compile="on", dtype="bfloat16")
    peak, fast = result["cpu_peak"], result["fast"]
    assert peak["fp32_tflops"] > 0 and peak["bf16_tflops"] >= peak["fp32_tflops"]
    assert result["peak_arithmetic"] == "fp32" and fast["peak_arithmetic"] == "bf16"
    assert result["peak_fraction"] == pytest.approx(
        2 * result["gmacs"] * 1e9 * result["images_per_s"] / (peak["fp32_tflops"] * 1e12))
    # the fast path counts the MACs it computes (late upsampling), fewer than the network's
    assert 0 < result["fast_gmacs"] < result["gmacs"]
    assert 0 < result["fast_train_gmacs"] < result["train_gmacs"]
    assert fast["peak_fraction"] == pytest.approx(
        2 * result["fast_gmacs"] * 1e9 * fast["images_per_s"] / (peak["bf16_tflops"] * 1e12))
    assert result["cpu_peak_fraction"] == pytest.approx(
        2 * result["gmacs"] * 1e9 / (result["cpu_ms"] / 1000)
        / (peak["fp32_tflops"] / peak["cores"] * 1e12))
    assert result["train_peak_fraction"] > 0 and fast["train_peak_arithmetic"] == "bf16"
    assert fast["train_cpu_peak_fraction"] == pytest.approx(
        3 * 2 * result["fast_train_gmacs"] * 1e9 * 2 / (fast["train_cpu_ms"] / 1000)
        / (peak["bf16_tflops"] / peak["cores"] * 1e12))
    assert fast["compile_s"] > 0 and fast["compile_rule"]  # compiled on its first call
    table = format_table(result)
    assert "% CPU peak wall/cpu" in table and "bf16" in table and "an estimate" in table
    assert "fast compile:" in table and "torch.compile rule:" in table
    assert "late upsampling: the fast paths compute" in table


def test_a_path_above_the_estimated_peak_is_explained():
    peak = {"describe": "estimated CPU peak 166 GFLOP/s fp32 (2 cores x 2.60 GHz)"}
    below = {"cpu_peak": peak, "peak_fraction": 0.8, "fast": {"cpu_peak_fraction": 0.9}}
    above = {"cpu_peak": peak, "peak_fraction": 0.8, "fast": {"cpu_peak_fraction": 1.07}}
    assert not bench._above_the_estimate(below) and bench._above_the_estimate(above)
    notes = [line for line in bench._figure_notes(above) if "estimated CPU peak" in line]
    assert notes and "turbo" in notes[0]
    assert "turbo" not in " ".join(bench._figure_notes(below))


def test_break_even_images_is_the_compile_over_the_saving():
    assert bench.break_even_images(30.0, 5000.0, 2000.0, batch=1) == pytest.approx(10.0)
    assert bench.break_even_images(30.0, 5000.0, 2000.0, batch=2) == pytest.approx(20.0)
    assert bench.break_even_images(30.0, 2000.0, 2500.0, batch=1) is None  # never pays
    assert bench.break_even_images(None, 5000.0, 2000.0, batch=1) is None  # not compiled


@pytest.mark.slow
def test_int8_row_and_the_demo_checkpoint_accuracy(no_compile, tmp_path):
    pytest.importorskip("torchao")
    path = tmp_path / "bench.json"
    assert main(["--config", "upernet_small_test", "--device", "cpu", "--size", "32x32",
                 "--fast", "--int8", "--warmup", "0", "--repeats", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    int8 = result["int8"]
    assert int8["images_per_s"] > 0 and len(int8["speedup_runs"]) == 2
    assert int8["peak_arithmetic"] == "int8" and int8["quantize_s"] > 0
    accuracy = result["demo_accuracy"]["paths"]
    assert set(accuracy) == {"eager fp32", "fast", "int8"}
    assert accuracy["eager fp32"]["agreement"] == 1.0
    assert accuracy["eager fp32"]["miou"] > 0.5  # the trained checkpoint, not random weights
    assert 0.9 < accuracy["int8"]["agreement"] < 1.0  # int8 really rounds, and stays close
    assert accuracy["int8"]["miou_change"] == pytest.approx(
        accuracy["int8"]["miou"] - accuracy["eager fp32"]["miou"])
    table = format_table(result)
    assert "int8 (PT2E, x86 inductor)" in table and "argmax agreement" in table


def test_int8_is_refused_off_the_cpu(capsys):
    assert main(["--config", "upernet_small_test", "--device", "cuda", "--int8"]) == 2
    assert "--int8 runs on the CPU only" in capsys.readouterr().err
