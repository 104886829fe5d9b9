"""Checkpoints that changed after they were written are refused through the real command line
(issue 19, items 3 and 8): flipped bytes in a .pt (its zip CRC) or a model.safetensors (the
digest in its metadata), a tensor changed under an unchanged digest, integer or bool tensors
where the model has floats; and the files written get the umask's permissions."""
from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from upernet_ref import hub
from upernet_ref.checkpoints import read_checkpoint_file, tensor_digest

from helpers_cli import one_line, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration run of upernet_small_test (CLI) and its model folder."""
    from upernet_ref.cli import main
    tmp = tmp_path_factory.mktemp("integrity")
    assert main(["train", "--config", "upernet_small_test", "--no-progress", "--no-val",
                 "--max-iters", "2", "--out", str(tmp / "run")]) == 0
    assert main(["export", "--checkpoint", str(tmp / "run" / "last.pt"), "--format",
                 "safetensors", "--out", str(tmp / "folder"), "--no-check"]) == 0
    return tmp


def flipped(source, target, count=4000):
    """A copy of `source` with `count` bytes inverted in its middle."""
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + min(count, len(data) // 4)):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_every_checkpoint_written_carries_the_digest_of_its_tensors(trained):
    raw = torch.load(trained / "run" / "last.pt", weights_only=True)
    assert raw.pop("sha256") == tensor_digest(raw)
    assert read_checkpoint_file(trained / "run" / "last.pt").keys() == raw.keys()  # checked, gone
    from safetensors import safe_open
    with safe_open(str(trained / "folder" / "model.safetensors"), "pt") as f:
        assert f.metadata()["sha256"] == tensor_digest({k: f.get_tensor(k) for k in f.keys()})


def test_a_pt_with_flipped_bytes_is_refused_by_eval_and_resume(trained, tmp_path, capfd):
    bad = flipped(trained / "run" / "last.pt", tmp_path / "last.pt")
    code, out, err = run(capfd, ["eval", "--checkpoint", str(bad), "--no-progress"])
    assert code == 2 and "evaluating" not in out
    one_line(err, "eval", f"{bad}: damaged checkpoint", "fails its CRC check")
    code, _, err = run(capfd, ["train", "--config", "upernet_small_test", "--no-progress",
                               "--max-iters", "4", "--out", str(tmp_path), "--resume"])
    assert code == 2
    one_line(err, "train", f"{bad}: damaged checkpoint")


def test_a_tensor_changed_under_its_digest_is_refused(trained, tmp_path, capfd):
    ckpt = torch.load(trained / "run" / "last.pt", weights_only=True)
    ckpt["model"]["decode_head.classifier.bias"][0] += 1.9e5  # the digest is left as it was
    torch.save(ckpt, tmp_path / "changed.pt")
    code, _, err = run(capfd, ["eval", "--checkpoint", str(tmp_path / "changed.pt"),
                               "--no-progress"])
    assert code == 2
    one_line(err, "eval", f"{tmp_path / 'changed.pt'}: damaged checkpoint, its tensors' SHA-256")


def test_a_model_safetensors_with_flipped_bytes_is_refused(trained, tmp_path, capfd):
    folder = shutil.copytree(trained / "folder", tmp_path / "folder")
    flipped(trained / "folder" / "model.safetensors", folder / "model.safetensors", count=64)
    code, _, err = run(capfd, ["eval", "--checkpoint", str(folder), "--no-progress"])
    assert code == 2
    one_line(err, "eval", str(folder / "model.safetensors"), "damaged checkpoint")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_not_cast(trained, tmp_path, capfd, dtype):
    folder = shutil.copytree(trained / "folder", tmp_path / "folder")
    tensors = load_file(str(folder / "model.safetensors"))
    key = "decode_head.classifier.weight"
    tensors[key] = (tensors[key] * 100).round().to(dtype)
    save_file(tensors, str(folder / "model.safetensors"))  # a third-party file: no digest
    code, _, err = run(capfd, ["eval", "--checkpoint", str(folder), "--no-progress"])
    assert code == 2
    one_line(err, "eval", f"{key} {dtype} (model torch.float32)", "refused rather than cast")


def test_written_files_get_the_umasks_permissions(trained):
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for path in [trained / "run" / name for name in ("last.pt", "log.jsonl", "config.json")] + \
            [trained / "folder" / name for name in ("model.safetensors", "config.json", "README.md")]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_a_folder_from_elsewhere_without_a_digest_still_loads(trained, tmp_path):
    """Folders and .safetensors files written by other tools carry no digest: read as they are."""
    folder = shutil.copytree(trained / "folder", tmp_path / "plain")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(tensors, str(folder / "model.safetensors"))  # no metadata at all
    model = hub.from_pretrained(folder)
    torch.testing.assert_close(model.state_dict()["decode_head.classifier.weight"],
                               tensors["decode_head.classifier.weight"], rtol=0, atol=0)
