"""The embedded demo dataset: the data contract, determinism, and what makes it a real task."""
from __future__ import annotations

import torch

from upernet_ref.configs import get_config
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes


def test_contract_dtypes_shapes_labels():
    ds = DemoScenes("train", num_samples=6, size=(48, 64))
    assert len(ds) == 6
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 48, 64)
        assert mask.dtype == torch.int64 and tuple(mask.shape) == (48, 64)
        labels = set(mask.unique().tolist())
        assert labels <= set(range(8)) | {255}, labels
        assert 255 in labels  # the one-pixel boundaries at least
    assert ds.ignore_index == 255
    assert "train" in ds.describe(3) and "[3]" in ds.describe(3)


def test_classes_match_the_demo_config():
    n = get_config("upernet_small_demo").data.num_classes
    assert len(DEMO_CLASSES) == len(DEMO_PALETTE) == n == DemoScenes().num_classes
    assert len(set(DEMO_PALETTE)) == n  # distinct colours
    assert len(DemoScenes("train")) == 400 and len(DemoScenes("val")) == 50


def test_every_class_appears_and_ignore_is_a_minority():
    ds = DemoScenes("train", num_samples=40)
    masks = torch.stack([ds[i][1] for i in range(len(ds))])
    counts = torch.bincount(masks.flatten(), minlength=256)
    assert (counts[:8] > 0).all(), counts[:8]
    ignore = counts[255].item() / masks.numel()
    assert 0.005 < ignore < 0.15, ignore


def test_deterministic_by_seed_split_and_index():
    a, b = DemoScenes("train", seed=3), DemoScenes("train", seed=3)
    _ = b[7]  # access order must not matter
    for i in (0, 5, 399):
        torch.testing.assert_close(a[i][0], b[i][0])
        torch.testing.assert_close(a[i][1], b[i][1])
    assert not torch.equal(a[0][0], DemoScenes("train", seed=4)[0][0])
    assert not torch.equal(a[0][0], DemoScenes("val", seed=3)[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    torch.testing.assert_close(a[-1][1], a[399][1])


def nearest_mean_accuracy(pixels, labels, classes):
    """Fit per-class mean colours on half the pixels, classify the other half by nearest mean."""
    keep = torch.isin(labels, torch.tensor(classes))
    pixels, labels = pixels[keep], labels[keep]
    half = len(labels) // 2
    means = torch.stack([pixels[:half][labels[:half] == c].mean(0) for c in classes])
    predicted = torch.tensor(classes)[torch.cdist(pixels[half:], means).argmin(1)]
    return (predicted == labels[half:]).float().mean().item()


def test_colour_is_a_cue_but_not_a_perfect_one():
    """Disc/ring and triangle/cross overlap in colour: the shape has to decide."""
    ds = DemoScenes("train", num_samples=60)
    items = [ds[i] for i in range(len(ds))]
    pixels = torch.cat([image.flatten(1).T.float() for image, _ in items])
    labels = torch.cat([mask.flatten() for _, mask in items])
    for pair in ((2, 6), (4, 7)):
        assert 0.55 < nearest_mean_accuracy(pixels, labels, pair) < 0.85, pair
    assert 0.4 < nearest_mean_accuracy(pixels, labels, (2, 3, 4, 5, 6, 7)) < 0.85


def test_transform_and_bad_arguments():
    ds = DemoScenes("val", num_samples=2, transform=lambda im, m: (im.float(), m + 0))
    assert ds[0][0].dtype == torch.float32
    for bad in (dict(split="training"), dict(size=(8, 8)), dict(num_samples=-1)):
        try:
            DemoScenes(**bad)
        except ValueError as err:
            assert "DemoScenes" in str(err)
        else:
            raise AssertionError(f"{bad} was accepted")
    try:
        ds[2]
    except IndexError:
        pass
    else:
        raise AssertionError("index 2 of 2 items was accepted")


def test_demo_scenes_refuse_another_class_count_in_one_line(tmp_path, capsys):
    from upernet_ref.cli import main

    code = main(["train", "--config", "upernet_small_demo", "--data.num_classes=5",
                 "--max-iters", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err]  # one line, no traceback
    assert "demo scenes have 8 classes" in err and "data.num_classes=5" in err
