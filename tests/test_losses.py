"""The training loss: CE ignores 255, aux weighting, class weights, OHEM keeps >= min_kept."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from upernet_ref.configs import TrainConfig
from upernet_ref.training.losses import cross_entropy, ohem_mask, segmentation_loss


def _example(seed: int = 0, b: int = 2, k: int = 5, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[:, :2, :3] = 255  # an ignored region
    return logits, target


def test_ce_is_mean_over_non_ignored_pixels():
    logits, target = _example()
    valid = target != 255
    # by hand: -log softmax of the true class, averaged over valid pixels only
    logp = logits.log_softmax(1)
    picked = logp.gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1)
    expected = -(picked[valid]).mean()
    torch.testing.assert_close(cross_entropy(logits, target), expected)


def test_changing_logits_at_ignored_pixels_changes_nothing():
    logits, target = _example()
    logits = logits.requires_grad_()
    loss = cross_entropy(logits, target)
    other = logits.detach().clone()
    other[target.unsqueeze(1).expand_as(other) == 255] = 1e3  # wild values at ignored pixels
    torch.testing.assert_close(cross_entropy(other, target), loss.detach())
    loss.backward()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().max() > 0


def test_all_ignored_gives_zero_not_nan():
    logits, _ = _example()
    target = torch.full((2, 6, 7), 255, dtype=torch.int64)
    loss = cross_entropy(logits.requires_grad_(), target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_class_weights_follow_torch_weighted_mean():
    logits, target = _example()
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    expected = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    torch.testing.assert_close(cross_entropy(logits, target, class_weights=w), expected)
    cfg = TrainConfig(class_weights=tuple(w.tolist()), aux_loss_weight=0.0)
    total, _ = segmentation_loss({"out": logits}, target, cfg)
    torch.testing.assert_close(total, expected)
    with pytest.raises(ValueError, match="class_weights"):
        segmentation_loss({"out": logits}, target, TrainConfig(class_weights=(1.0, 2.0)))


def test_aux_weighting():
    logits, target = _example(0)
    aux, _ = _example(1)
    cfg = TrainConfig()  # loss_weight 1.0, aux_loss_weight 0.4
    total, parts = segmentation_loss({"out": logits, "aux": aux}, target, cfg)
    ce_out, ce_aux = cross_entropy(logits, target), cross_entropy(aux, target)
    torch.testing.assert_close(parts["loss_out"], ce_out)
    torch.testing.assert_close(parts["loss_aux"], ce_aux)
    torch.testing.assert_close(total, ce_out + 0.4 * ce_aux)
    cfg2 = dataclasses.replace(cfg, loss_weight=2.0, aux_loss_weight=1.0)
    total2, _ = segmentation_loss({"out": logits, "aux": aux}, target, cfg2)
    torch.testing.assert_close(total2, 2.0 * ce_out + ce_aux)
    # evaluation-mode outputs have no "aux": only the main term
    total3, parts3 = segmentation_loss({"out": logits}, target, cfg)
    torch.testing.assert_close(total3, ce_out)
    assert "loss_aux" not in parts3


def test_ohem_keeps_hard_pixels_and_at_least_min_kept():
    logits, target = _example(b=2, h=10, w=10)
    valid = target != 255
    prob = logits.softmax(1).gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1)
    # a low threshold keeps few pixels by probability, so min_kept decides
    for min_kept in (1, 20, 60):
        kept = ohem_mask(logits, target, thresh=0.01, min_kept=min_kept)
        assert not (kept & ~valid).any(), "OHEM must never keep an ignored pixel"
        assert kept.sum() >= min(min_kept * 2, valid.sum())
        # the kept pixels are the hardest: every kept prob < every dropped valid prob
        dropped = valid & ~kept
        if dropped.any():
            assert prob[kept].max() <= prob[dropped].min()
    # a threshold of 1.0 keeps every valid pixel whose prob < 1
    kept = ohem_mask(logits, target, thresh=1.0, min_kept=1)
    assert kept.sum() == valid.sum()
    # a threshold above all probs with min_kept 0 keeps exactly those below thresh
    t = prob[valid].median().item()
    kept = ohem_mask(logits, target, thresh=t, min_kept=0)
    assert torch.equal(kept, valid & (prob < max(t, prob[valid].min().item())))


def test_ohem_loss_is_ce_over_kept_pixels():
    logits, target = _example(b=2, h=10, w=10)
    cfg = TrainConfig(ohem=True, ohem_thresh=0.3, ohem_min_kept=10, aux_loss_weight=0.0)
    total, _ = segmentation_loss({"out": logits}, target, cfg)
    kept = ohem_mask(logits, target, 0.3, 10)
    expected = cross_entropy(logits, target.masked_fill(~kept, 255))
    torch.testing.assert_close(total, expected)
    assert total > cross_entropy(logits, target)  # hard pixels have the larger losses


def test_ohem_with_fewer_valid_pixels_than_min_kept_follows_mmseg():
    """mmseg indexes the sorted probabilities at min(min_kept x B, n - 1): the easiest pixel
    is dropped when its probability is above thresh, kept when thresh is higher."""
    logits, target = _example(b=1, h=4, w=4)
    valid = target != 255
    prob = logits.softmax(1).gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1)
    top = prob[valid].max().item()
    kept = ohem_mask(logits, target, thresh=0.0, min_kept=10_000)
    assert torch.equal(kept, valid & (prob < top))
    kept = ohem_mask(logits, target, thresh=top + 1e-3, min_kept=10_000)
    assert torch.equal(kept, valid)
