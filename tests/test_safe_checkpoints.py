"""Opening a checkpoint never runs code from it; exact resume survives the safe format.

A `.pth` is a pickle, and a pickle may name any function to call while it is read. Every entry
point that opens a checkpoint (the issue's list: eval, predict, train --weights, --resume FILE,
implicit --resume, --backbone-weights, export to onnx and torch-export, load_weights,
load_backbone_weights) gets a file whose `__reduce__` would write a marker file; the marker must
never appear and each command must refuse in one `upernet CMD: error:` line.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_ref import build_model
from upernet_ref.checkpoints import (CheckpointError, load_backbone_weights, load_weights,
                                     read_checkpoint_file)
from upernet_ref.cli import main as upernet

from test_train import TinyScenes, params, run, small_cfg


class WritesMarker:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    """(marker path, {variant: malicious checkpoint file})."""
    marker = tmp_path / "MARKER"
    files = {}
    # a training-checkpoint-looking dict with the payload inside, as torch.save writes it
    files["nested"] = tmp_path / "nested.pth"
    torch.save({"model": build_model("upernet_small_test").state_dict(),
                "meta": WritesMarker(marker)}, files["nested"])
    # not a dict at all: the code ran before the old "expected a dict" check
    files["bare"] = tmp_path / "bare.pth"
    torch.save(WritesMarker(marker), files["bare"])
    # a plain pickle (no zip container), like torch.save(..., _use_new_zipfile_serialization=False)
    files["legacy"] = tmp_path / "legacy.pth"
    with open(files["legacy"], "wb") as f:
        pickle.dump({"state_dict": WritesMarker(marker)}, f)
    return marker, files


def _image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return path


ENTRY_POINTS = {
    "eval": lambda f, t: ["eval", "--checkpoint", f, "--no-progress"],
    "predict": lambda f, t: ["predict", "--checkpoint", f, "--out", t / "preds", _image(t)],
    "train --weights": lambda f, t: ["train", "--config", "upernet_small_test", "--out", t / "w",
                                     "--weights", f, "--max-iters", "1", "--no-progress"],
    "train --backbone-weights": lambda f, t: ["train", "--config", "upernet_small_test", "--out",
                                              t / "b", "--backbone-weights", f, "--max-iters", "1",
                                              "--no-progress"],
    "train --resume FILE": lambda f, t: ["train", "--config", "upernet_small_test", "--out",
                                         t / "r", "--resume", f, "--max-iters", "1",
                                         "--no-progress"],
    "export onnx": lambda f, t: ["export", "--checkpoint", f, "--format", "onnx", "--out",
                                 t / "m.onnx"],
    "export torch-export": lambda f, t: ["export", "--checkpoint", f, "--format", "torch-export",
                                         "--out", t / "m.pt2"],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malicious_pickle_runs_nothing_at_any_command(entry, evil, tmp_path, capsys):
    marker, files = evil
    command = ENTRY_POINTS[entry]
    for variant, path in files.items():
        code = upernet([str(a) for a in command(path, tmp_path)])
        err = capsys.readouterr().err.strip()
        assert not marker.exists(), f"{entry} ran the pickle's code ({variant})"
        assert code != 0, (entry, variant)
        name = entry.split()[0]
        assert err.startswith(f"upernet {name}: error: {path}: refused to open"), (variant, err)
        assert "\n" not in err and "--trust-checkpoint" in err, err
        assert "posix.system" in err or "os.system" in err, err  # says what it wanted to call


def test_implicit_resume_of_a_malicious_last_pt_runs_nothing(evil, tmp_path, capsys):
    marker, files = evil
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(files["nested"].read_bytes())
    code = upernet(["train", "--config", "upernet_small_test", "--out", str(out), "--resume",
                    "--max-iters", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not marker.exists()
    assert err.startswith(f"upernet train: error: {out / 'last.pt'}: refused to open"), err
    assert "\n" not in err


def test_the_library_loaders_run_nothing_either(evil):
    marker, files = evil
    for path in files.values():
        for load in (load_weights, load_backbone_weights):
            with pytest.raises(CheckpointError, match="refused to open") as info:
                load(build_model("upernet_small_test"), path)
            assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_trust_checkpoint_opens_a_file_that_needs_python_objects(tmp_path, capsys):
    """A published file with a pickled object in its metadata (an argparse.Namespace, as old
    training scripts saved): refused by default, opened with trust=True after a warning."""
    model = build_model("upernet_small_test")
    path = tmp_path / "published.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"args": argparse.Namespace(lr=0.01)}},
               path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_weights(build_model("upernet_small_test"), path)
    fresh = load_weights(build_model("upernet_small_test"), path, trust=True)
    assert "warning" in capsys.readouterr().err
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    # and through the command line
    code = upernet(["eval", "--checkpoint", str(path), "--config", "upernet_small_test",
                    "--trust-checkpoint", "--limit", "1", "--no-progress",
                    "--json", str(tmp_path / "eval.json")])
    assert code == 0
    assert f"warning: {path}: --trust-checkpoint" in capsys.readouterr().err


def _as_before_this_change(path):
    """Rewrite a trainer checkpoint as the trainer wrote it before: numpy's RNG state as
    `np.random.get_state()`'s tuple, an ndarray inside (which weights_only refuses by default)."""
    ckpt = read_checkpoint_file(path)
    for state in ckpt["rng"]:
        n = state["numpy"]
        state["numpy"] = (n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                          n["has_gauss"], n["cached_gaussian"])
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # really the old format
        torch.load(path, weights_only=True)


def test_runs_trained_before_and_after_the_safe_format_resume_exactly(tmp_path):
    cfg = small_cfg()
    full = run(cfg, tmp_path / "full", max_iters=6)
    first = run(cfg, tmp_path / "split", max_iters=6, stop_at=4)
    # the new checkpoints are plain data: torch's own safe loader reads them as they are
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["iteration"] == 4
    shutil.copytree(tmp_path / "split", tmp_path / "old")
    _as_before_this_change(tmp_path / "old" / "last.pt")
    for written in ("split", "old"):  # trained after this change, and before it
        second = run(cfg, tmp_path / written, max_iters=6, resume=True, train_dataset=TinyScenes())
        torch.testing.assert_close(torch.tensor(first.losses + second.losses),
                                   torch.tensor(full.losses), rtol=0, atol=1e-6, msg=written)
        a, b = params(tmp_path / "full" / "last.pt"), params(tmp_path / written / "last.pt")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{written}: {k}")
