"""The one training step (`training/step.py`): what the trainer, the batch probe, the memory
estimate and the benchmark all run."""
from __future__ import annotations

import pytest
import torch

from upernet_ref.configs import get_config, override
from upernet_ref.model import build_model
from upernet_ref.training import trainer as trainer_mod
from upernet_ref.training.schedule import build_optimizer
from upernet_ref.training.trainer import NonFiniteLossError, train_step

CFG = override(get_config("upernet_small_test"), {"model.dropout": 0.0})


def batch(n: int = 4, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.randint(0, CFG.data.num_classes, (n, size, size), generator=g)
    return images, masks


def setup(cfg=CFG):
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scaler


def test_one_step_updates_the_weights_and_returns_the_loss_parts():
    model, optimizer, scaler = setup()
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_step(model.train(), batch(), optimizer, scaler, CFG)
    tc = CFG.train
    assert float(losses.loss) == pytest.approx(
        tc.loss_weight * float(losses.loss_out) + tc.aux_loss_weight * float(losses.loss_aux),
        rel=1e-5)
    assert float(losses.loss_aux) > 0  # the auxiliary head is trained too
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad is not None)


def test_micro_batches_accumulate_to_the_whole_batch_s_update():
    """Two micro-batches of 2 = one batch of 4 (BN with running statistics, no ignored pixel:
    each micro-batch's mean loss has the same pixel count, so the mean of the two is the mean)."""
    images, masks = batch()
    whole, opt_whole, scaler = setup()
    parts, opt_parts, _ = setup()
    a = train_step(whole.eval(), (images, masks), opt_whole, scaler, CFG)
    b = train_step(parts.eval(), [(images[:2], masks[:2]), (images[2:], masks[2:])], opt_parts,
                   scaler, CFG)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(whole.named_parameters(), parts.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_loss_raises_before_the_update(monkeypatch):
    real = trainer_mod.segmentation_loss

    def nan_loss(*args, **kwargs):
        total, parts = real(*args, **kwargs)
        return total * float("nan"), parts

    monkeypatch.setattr(trainer_mod, "segmentation_loss", nan_loss)
    model, optimizer, scaler = setup()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train_step(model.eval(), batch(), optimizer, scaler, CFG)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_the_configuration_s_loss_options_change_the_step():
    images, masks = batch()
    weighted = override(CFG, {"train.class_weights": tuple(float(k + 1) for k in range(8)),
                              "train.ohem": True, "train.ohem_min_kept": 10,
                              "data.ignore_index": 3})
    model, optimizer, scaler = setup()
    plain = train_step(model.eval(), (images, masks), optimizer, scaler, CFG)
    model, optimizer, scaler = setup(weighted)
    other = train_step(model.eval(), (images, masks), optimizer, scaler, weighted)
    assert abs(float(plain.loss) - float(other.loss)) > 1e-3


def test_the_memory_estimate_runs_the_training_step(monkeypatch):
    from upernet_ref.perf.memory import estimate_training_memory
    calls = []
    real = trainer_mod.train_step

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", spy)
    estimate_training_memory(CFG, 3, (32, 32), "none")  # batch 3: not in the estimate's cache
    assert len(calls) == 2 and all(c["check_finite"] is False for c in calls)
