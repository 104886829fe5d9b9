"""Poly schedule values at chosen iterations (computed by hand), warmup, SGD settings."""
from __future__ import annotations

import math

import pytest
import torch

from upernet_ref.configs import TrainConfig, get_config
from upernet_ref.training.schedule import (build_optimizer, build_scheduler, epochs_to_iters,
                                  iters_per_epoch, poly_lr)


def test_poly_values_by_hand():
    # (0.01 - 1e-4) * (1 - it / 100) ** 0.9 + 1e-4
    assert poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert poly_lr(50, 100, 0.01) == pytest.approx(0.0099 * 0.5 ** 0.9 + 1e-4)  # 0.0054053
    assert poly_lr(50, 100, 0.01) == pytest.approx(0.0054053, rel=1e-4)
    assert poly_lr(90, 100, 0.01) == pytest.approx(0.0099 * 0.1 ** 0.9 + 1e-4)  # 0.0013463
    assert poly_lr(90, 100, 0.01) == pytest.approx(0.0013463, rel=1e-4)
    assert poly_lr(100, 100, 0.01) == pytest.approx(1e-4)
    assert poly_lr(150, 100, 0.01) == pytest.approx(1e-4)  # clamped after the end
    assert poly_lr(10, 20, 0.1, min_lr=0.0, power=1.0) == pytest.approx(0.05)  # linear case


def test_warmup_starts_at_ratio_and_joins_the_curve():
    base = dict(max_iters=1000, base_lr=0.01, min_lr=1e-4, power=0.9)
    assert poly_lr(0, warmup_iters=100, warmup_ratio=0.1, **base) == pytest.approx(0.001)
    mid = poly_lr(50, **base) * (1 - 0.5 * 0.9)
    assert poly_lr(50, warmup_iters=100, warmup_ratio=0.1, **base) == pytest.approx(mid)
    assert poly_lr(100, warmup_iters=100, warmup_ratio=0.1, **base) == pytest.approx(poly_lr(100, **base))


def test_scheduler_steps_the_optimizer_through_the_curve():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=0.02, min_lr=1e-4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_iters=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [poly_lr(i, 10, 0.02, 1e-4, 0.9) for i in range(10)]
    assert seen == pytest.approx(expected)
    # the state dict round-trips (resume)
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg, max_iters=10)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 10


def test_sgd_matches_the_recipe():
    opt = build_optimizer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
                          TrainConfig())
    assert len(opt.param_groups) == 1  # one lr and one weight decay for all, BN included
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.01, 0.9, 5e-4, False)
    assert len(g["params"]) == 4


def test_epochs_to_iterations_match_the_model_card():
    assert iters_per_epoch(10_582, 16) == 661
    assert iters_per_epoch(20_210, 16) == 1263
    assert iters_per_epoch(2_975, 8) == 372
    for name, total in [("upernet_r50_os8_voc", 39_660), ("upernet_r50_os8_ade20k", 164_190),
                        ("upernet_r101_os16_cityscapes", 81_840)]:
        cfg = get_config(name)
        assert cfg.train.max_iters == total
    assert epochs_to_iters(60, 10_582, 16) == 39_660
    with pytest.raises(ValueError):
        iters_per_epoch(0, 16)
    assert math.isclose(poly_lr(39_659, 39_660, 0.01), 0.0099 * (1 / 39_660) ** 0.9 + 1e-4)
