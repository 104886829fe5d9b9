"""`upernet memory`: the training-step memory estimate from fake tensors."""
from __future__ import annotations

import json

import pytest
import torch

from upernet_ref import build_model
from upernet_ref.perf.memory import MB, estimate_training_memory, largest_batch
from upernet_ref.cli.memory import main

CFG = "upernet_small_test"
SIZE = (64, 64)


def test_weights_and_momentum_are_the_model_s_own_bytes():
    est = estimate_training_memory(CFG, 2, SIZE, "none")
    model = build_model(CFG)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    buffers = sum(b.numel() * b.element_size() for b in model.buffers()) / MB
    assert est.weights_mb == pytest.approx(params + buffers, rel=1e-6)
    assert est.optimizer_mb == pytest.approx(params, rel=1e-6)  # one momentum buffer per weight
    assert est.total_mb >= est.weights_mb + est.optimizer_mb + est.activations_mb
    # the logits at input resolution (kept for the loss's backward) are part of the activations
    logits = 2 * 8 * SIZE[0] * SIZE[1] * 4 / MB
    assert est.activations_mb > logits


def test_memory_is_affine_in_the_batch_and_smaller_in_bf16():
    e2, e4, e6 = (estimate_training_memory(CFG, b, SIZE, "none") for b in (2, 4, 6))
    assert e4.total_mb - e2.total_mb == pytest.approx(e6.total_mb - e4.total_mb, rel=0.05)
    assert e4.total_mb > e2.total_mb
    half = estimate_training_memory(CFG, 4, SIZE, "bf16")
    assert half.activations_mb < 0.8 * e4.activations_mb
    one = estimate_training_memory(CFG, 1, SIZE, "none")  # batch 1 (SyncBN) is estimated too
    assert 0 < one.activations_mb < e2.activations_mb


def test_largest_batch_is_the_last_that_fits():
    budget_gb = 0.05
    batch, est = largest_batch(CFG, budget_gb, SIZE, "none", headroom=1.0)
    assert est.batch == batch and est.total_mb <= budget_gb * 1024
    assert estimate_training_memory(CFG, batch + 1, SIZE, "none").total_mb > budget_gb * 1024


def test_command_line(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["--config", CFG, "--batch", "2", "--size", "64x64", "--amp", "none",
                 "--memory-gb", "0.05", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert CFG in text and "2x64x64" in text
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["amp"] == "none" and rows[0]["largest_batch"] >= 2
    assert main(["--config", "no_such_config"]) == 2
    assert "no_such_config" in capsys.readouterr().err


def test_the_estimate_leaves_no_fake_mode_behind():
    estimate_training_memory(CFG, 2, SIZE, "none")
    x = torch.ones(2)
    assert float((x + 1).sum()) == 4.0  # real arithmetic again


def test_largest_batch_bisects_when_the_affine_guess_is_too_large(monkeypatch):
    import upernet_ref.perf.memory as memory
    calls = []

    def fake(cfg, batch, size=None, amp=None):  # affine up to 50 images, then a cliff
        calls.append(batch)
        total = 10.0 + batch + (1000.0 if batch > 50 else 0.0)
        return memory.MemoryEstimate("x", batch, (8, 8), "none", 1, 1, batch, 0, total)

    monkeypatch.setattr(memory, "estimate_training_memory", fake)
    batch, est = memory.largest_batch("x", memory_gb=100 / 1024, headroom=1.0)  # 100 MB
    assert (batch, est.total_mb) == (50, 60.0)
    assert len(calls) < 15  # a bisection, not a walk down one batch at a time
