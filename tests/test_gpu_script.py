"""benchmarks/gpu_figures.sh stays runnable: its CPU dry run (small config, sizes / 8).

The script is what a session with a GPU runs to check the CUDA paths and produce the GPU figures
of docs/benchmarks.md; nothing else exercises it on a machine without a GPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_figures.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_of_the_inference_stage(tmp_path):
    env = {**os.environ, "GPU_FIGURES_DRY_RUN": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "infer", "nonsense"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    # the unknown stage is reported and makes the run fail, after the known one ran
    assert run.returncode == 1 and "unknown stage nonsense" in run.stdout, run.stdout[-2000:]
    for name in ("r50_os8_512_b1_infer", "r50_os8_512_b16_infer"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["device"] == "cpu" and result["latency_ms"] > 0
        assert result["fast"]["latency_ms"] > 0
        assert "torch.compile" not in result["fast"]["settings"]  # dry run: --compile off
    status = (tmp_path / "status.tsv").read_text().splitlines()
    assert [line.split("\t")[3] for line in status] == ["ok", "ok"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| r50_os8_512_b") == 4  # eager and fast, batch 1 and 16
