"""The published train / test pipelines: sizes, padding, joint geometry, cat_max_ratio, seeding."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from upernet_ref.data import transforms as T
from upernet_ref.configs import get_config
from upernet_ref.demo_scenes import DEMO_PALETTE, DemoScenes
from upernet_ref.training.data_order import SeededItems

DEMO = get_config("upernet_small_demo").data  # crop (64, 64), base_scale (128, 96)


def cfg(**changes):
    return dataclasses.replace(DEMO, **changes)


def coded_pair(h: int, w: int, seed: int = 0):
    """An image whose red channel is 20 x label (a block pattern), so geometry can be checked."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 8, (h // 8 + 1, w // 8 + 1), generator=g)
    mask = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w].clone()
    mask[0, :] = 255
    image = torch.stack([(mask % 256 * 20 % 256), torch.full_like(mask, 100), torch.arange(w).expand(h, w) % 256])
    return image.to(torch.uint8), mask


@pytest.mark.parametrize("size", [(20, 30), (64, 64), (96, 128), (300, 200)])
def test_train_output_is_crop_size(size):
    image, mask = coded_pair(*size)
    _ = torch.manual_seed(0)
    for _ in range(5):
        x, y = T.train_transform(DEMO)(image, mask)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, 64, 64)
        assert y.dtype == torch.int64 and tuple(y.shape) == (64, 64)
        assert set(y.unique().tolist()) <= set(mask.unique().tolist()) | {255}  # nearest only


def test_padding_values_bottom_right():
    image, mask = coded_pair(16, 24)
    c = cfg(base_scale=(24, 16), ratio_range=(1.0, 1.0), crop_size=(32, 40), photometric=False,
            flip_prob=0.0)
    x, y = T.train_transform(c)(image, mask)
    assert tuple(x.shape) == (3, 32, 40) and tuple(y.shape) == (32, 40)
    assert (x[:, 16:, :] == 0).all() and (x[:, :, 24:] == 0).all()
    assert (y[16:, :] == 255).all() and (y[:, 24:] == 255).all()
    torch.testing.assert_close(y[:16, :24], mask)
    assert (T.denormalize(x, c)[:, :16, :24] == image).all()  # no resize, no flip: unchanged


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_flip_is_applied_jointly(flip_prob):
    image, mask = coded_pair(32, 48)
    c = cfg(base_scale=(48, 32), ratio_range=(1.0, 1.0), crop_size=(32, 48), photometric=False,
            flip_prob=flip_prob)
    x, y = T.train_transform(c)(image, mask)
    expect_image, expect_mask = (image.flip(-1), mask.flip(-1)) if flip_prob else (image, mask)
    assert (T.denormalize(x, c) == expect_image).all()
    torch.testing.assert_close(y, expect_mask)


def test_crop_and_flip_keep_image_and_mask_aligned():
    """With no resize, every labelled output pixel still has red = 20 x label."""
    image, mask = coded_pair(80, 100, seed=1)
    c = cfg(base_scale=(100, 80), ratio_range=(1.0, 1.0), crop_size=(48, 48), photometric=False)
    _ = torch.manual_seed(1)
    flips = set()
    for _ in range(8):
        x, y = T.train_transform(c)(image, mask)
        red = T.denormalize(x, c)[0].long()
        valid = y != 255
        assert (red[valid] == (y[valid] * 20) % 256).all()
        flips.add(bool((T.denormalize(x, c)[2, 1, 0] > T.denormalize(x, c)[2, 1, -1]).item()))
    assert flips == {True, False}  # both flipped and unflipped crops were seen


def test_rescale_fits_base_scale_times_ratio():
    assert T.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert T.rescale_size(512, 683, (4096, 1024)) == (1024, 1366)
    assert T.rescale_size(1024, 2048, (1024, 256)) == (256, 512)
    image, mask = coded_pair(96, 128)
    _ = torch.manual_seed(0)
    sizes = {tuple(T.random_rescale(image, mask, (128, 96), (0.5, 2.0))[0].shape[1:]) for _ in range(20)}
    assert all(48 <= h <= 192 and abs(w / h - 128 / 96) < 0.05 for h, w in sizes)
    assert len(sizes) > 5


def test_cat_max_ratio_retries_crops():
    """Class 0 fills 48 of 64 columns: only crops starting at column 25..32 are 'balanced'."""
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[:, 48:] = 1
    mask[:, :3] = 255  # ignored pixels do not count towards either class
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)

    def balanced(m):
        counts = torch.bincount(m.flatten(), minlength=256)[:255].float()
        counts = counts[counts > 0]
        return len(counts) > 1 and (counts.max() / counts.sum()).item() < 0.75

    def rate(ratio):
        _ = torch.manual_seed(0)
        return sum(balanced(T.random_crop(image, mask, (32, 32), ratio)[1]) for _ in range(60)) / 60

    assert rate(1.0) < 0.45  # a plain random crop is usually dominated by class 0
    assert rate(0.75) > 0.8  # retried crops usually are not


def test_test_transform_fits_base_scale_and_keeps_the_mask():
    image, mask = coded_pair(48, 80)
    x, y = T.test_transform(DEMO)(image, mask)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 77, 128)  # factor min(128/80, 96/48)
    assert y.dtype == torch.int64 and torch.equal(y, mask)
    x, y = T.test_transform(DEMO)(*coded_pair(200, 150))
    assert tuple(x.shape[1:]) == (128, 96) and tuple(y.shape) == (200, 150)


def test_photometric_distortion_matches_hsv_definition():
    _ = torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = T.photometric_distortion(image)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
    # hue +18 (of 180) is a 0.1 turn: torchvision's adjust_hue agrees.
    shifted = T._adjust_hsv(image.float(), None, 18.0)
    torch.testing.assert_close(shifted / 255, TF.adjust_hue(image.float() / 255, 0.1), atol=1e-4, rtol=0)
    # saturation 0 gives grey = max channel (HSV value).
    grey = T._adjust_hsv(image.float(), 0.0, None)
    torch.testing.assert_close(grey, image.float().amax(0).expand(3, -1, -1))
    # same seed, same distortion; it does change the image
    _ = torch.manual_seed(5)
    a = [T.photometric_distortion(image) for _ in range(4)]
    _ = torch.manual_seed(5)
    b = [T.photometric_distortion(image) for _ in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert any(not torch.equal(p, image.float()) for p in a)


def test_bad_inputs_are_named():
    image, mask = coded_pair(16, 16)
    with pytest.raises(TypeError, match="uint8"):
        T.train_transform(DEMO)(image.float(), mask)
    with pytest.raises(ValueError, match="sizes differ"):
        T.train_transform(DEMO)(image, mask[:8])
    with pytest.raises(ValueError, match="0..255"):
        T.train_transform(DEMO)(image, mask + 300)


def test_denormalize_colorize_overlay():
    image, mask = coded_pair(16, 24)
    torch.testing.assert_close(T.denormalize(T.normalize(image, DEMO.mean, DEMO.std), DEMO), image)
    colors = T.colorize(mask, DEMO_PALETTE)
    assert colors.dtype == torch.uint8 and tuple(colors.shape) == (3, 16, 24)
    assert tuple(colors[:, 5, 5].tolist()) == DEMO_PALETTE[int(mask[5, 5])]
    assert tuple(colors[:, 0, 0].tolist()) == T.IGNORE_COLOR  # row 0 is 255
    blend = T.overlay(image, mask, DEMO_PALETTE, alpha=0.5)
    assert torch.equal(blend[:, 0], image[:, 0])  # ignored pixels show the image
    with pytest.raises(ValueError, match="palette"):
        T.colorize(torch.full((2, 2), 9), DEMO_PALETTE)


class SameItem(torch.utils.data.Dataset):
    """The same demo scene at every index, through the train transform (+ a numpy draw)."""

    def __init__(self):
        self.item = DemoScenes("train", num_samples=1)[0]
        self.transform = T.train_transform(DEMO)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x, y = self.transform(*self.item)
        return x, y, torch.tensor(np.random.randint(0, 2**31 - 1))


def _run(seed, workers=2):
    """The trainer's way: items keyed by (index, stream position) through `SeededItems`."""
    _ = torch.manual_seed(1234 + workers)  # the global generator must not matter
    keys = [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    loader = torch.utils.data.DataLoader(SeededItems(SameItem(), seed), batch_sampler=keys,
                                         num_workers=workers)
    return list(loader)


def test_dataloader_seeding_is_reproducible_and_per_position():
    first, second, other, serial = _run(0), _run(0), _run(1), _run(0, workers=0)
    for a, b, c in zip(first, second, serial):  # the same with 2 workers, again, or none
        assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(a, b, c))
    assert not torch.equal(first[0][0], other[0][0])
    # positions 0 and 2 (batches 0 and 1, from workers 0 and 1): other torch and numpy draws
    assert not torch.equal(first[0][0], first[1][0])
    assert not torch.equal(first[0][2], first[1][2])


def test_photometric_distortion_ranges_probabilities_and_contrast_order(monkeypatch):
    """Every step has probability 0.5 and mmseg's range; contrast goes first or last at random."""
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    coins, uniforms, ints = [], [], []
    script = iter([])

    def coin(p=0.5):
        coins.append(p)
        return next(script)

    def uniform(low, high):
        uniforms.append((low, high))
        return high

    def randint(low, high):
        ints.append((low, high))
        return high - 1

    monkeypatch.setattr(T, "_coin", coin)
    monkeypatch.setattr(T, "_uniform", uniform)
    monkeypatch.setattr(T, "_randint", randint)
    x = image.float()
    bright = (x + 32).clamp(0, 255)
    # all steps on, contrast first: brightness, contrast x1.5, saturation x1.5, hue +17
    script = iter([True] * 5)
    out = T.photometric_distortion(image)
    assert coins == [0.5] * 5
    assert sorted(uniforms) == [(-32, 32), (0.5, 1.5), (0.5, 1.5)] and ints == [(-18, 18)]
    first = T._adjust_hsv((bright * 1.5).clamp(0, 255), 1.5, 17.0)
    torch.testing.assert_close(out, first)
    # all steps on, contrast last (the order coin is the second draw)
    script = iter([True, False, True, True, True])
    out = T.photometric_distortion(image)
    last = (T._adjust_hsv(bright, 1.5, 17.0) * 1.5).clamp(0, 255)
    torch.testing.assert_close(out, last)
    assert not torch.allclose(first, last)
    # every step off: only the conversion to float
    script = iter([False] * 5)
    torch.testing.assert_close(T.photometric_distortion(image), x)
