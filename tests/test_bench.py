"""`upernet bench`: the JSON figures exist and are consistent (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from upernet_ref.bench import PEAK_TFLOPS, format_table, main, run_bench
from upernet_ref.configs import get_config
from upernet_ref.flops import count_macs
from upernet_ref.model import build_model


def test_bench_json_has_the_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--config", "upernet_small_test", "--device", "cpu", "--size", "32x48",
                 "--mode", "both", "--fast", "--warmup", "0", "--repeats", "1",
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
