"""Fine-tuning into another class count: `upernet train --weights FILE --reinit-classifier`.

The 8-class demo model (`upernet_small_demo`) fine-tunes on a 21-class VOC
folder made here; without the option the class-count mismatch is refused in one line.
"""
from __future__ import annotations

import pytest
import torch

from upernet_ref import build_model, configs, get_config
from upernet_ref.checkpoints import (CLASSIFIERS, CheckpointError, load_weights,
                                     read_checkpoint_file, save_checkpoint)
from upernet_ref.course import randomize_batchnorm
from upernet_ref.cli import main as upernet

from helpers_checkpoints import to_sssegmentation
from helpers_data import make_fake_voc


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The 8-class demo model as the trainer saves it (weights + configuration), built directly
    with non-trivial BatchNorm statistics (training it first would only cost time)."""
    cfg = get_config("upernet_small_demo")
    model = randomize_batchnorm(build_model(cfg), torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("demo") / "last.pt"
    return save_checkpoint({"model": model.state_dict(), "config": configs.to_dict(cfg)}, path)


VOC_21 = ["--config", "upernet_small_demo", "--data.dataset=voc", "--data.num_classes=21",
          "--max-iters", "2", "--no-val", "--no-progress"]


def test_reinit_classifier_fine_tunes_the_demo_model_on_21_voc_classes(demo_checkpoint, tmp_path,
                                                                        capsys):
    voc = make_fake_voc(tmp_path, n=8)
    out = tmp_path / "voc_run"
    code = upernet(["train", *VOC_21, "--data-root", str(voc), "--out", str(out),
                    "--weights", str(demo_checkpoint), "--reinit-classifier"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.out.splitlines() if "re-initialised" in line]
    assert len(notes) == 1 and "8 classes" in notes[0] and "for 21 classes" in notes[0], notes
    tuned = read_checkpoint_file(out / "last.pt")
    assert tuned["model"]["decode_head.classifier.weight"].shape[0] == 21
    assert tuned["model"]["aux_head.classifier.weight"].shape[0] == 21
    assert tuned["config"]["data"]["num_classes"] == 21  # the one class count


def test_reinit_classifier_keeps_every_other_weight(demo_checkpoint):
    """Straight after loading: all but the classifiers are the checkpoint's, and the classifiers
    are freshly initialised (not zeros, not the old ones cut down)."""
    demo = read_checkpoint_file(demo_checkpoint)["model"]
    model = build_model(get_config("upernet_small_demo", ["data.num_classes=21"]))
    notes = []
    load_weights(model, demo_checkpoint, reinit_classifier=True, log=notes.append)
    assert len(notes) == 1
    for key, value in model.state_dict().items():
        if key.startswith(CLASSIFIERS):
            assert value.shape[0] == 21
        else:
            torch.testing.assert_close(value, demo[key], rtol=0, atol=0, msg=key)
    weight = model.decode_head.classifier.weight
    assert weight.std() > 0 and not torch.equal(weight[:8], demo["decode_head.classifier.weight"])


def test_reinit_classifier_takes_a_published_file(tmp_path):
    """An sssegmentation-layout file of another class count (its ADE20K-style 150 -> ours 5)."""
    source = build_model(get_config("upernet_small_test", ["data.num_classes=3"]))
    path = tmp_path / "published.pth"
    torch.save({"model": to_sssegmentation(source.state_dict())}, path)
    model = build_model(get_config("upernet_small_test", ["data.num_classes=5"]))
    load_weights(model, path, reinit_classifier=True, log=lambda _: None)
    torch.testing.assert_close(model.backbone.stem[0].weight, source.backbone.stem[0].weight)
    with pytest.raises(CheckpointError, match="was trained for 3 classes, the model has 5"):
        load_weights(build_model(get_config("upernet_small_test", ["data.num_classes=5"])), path)


def test_without_the_option_a_class_count_mismatch_is_one_line(demo_checkpoint, tmp_path, capsys):
    voc = make_fake_voc(tmp_path, n=4)
    code = upernet(["train", *VOC_21, "--data-root", str(voc), "--out", str(tmp_path / "o"),
                    "--weights", str(demo_checkpoint)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err, err
    assert err.startswith(f"upernet train: error: {demo_checkpoint} was trained for 8 "
                          f"classes, the model has 21"), err
    assert "--reinit-classifier" in err
    # and --reinit-classifier alone (no --weights) is a usage error
    with pytest.raises(SystemExit):
        upernet(["train", *VOC_21, "--reinit-classifier"])
    assert "give --weights" in capsys.readouterr().err
