"""The Hugging Face layout: `export --format safetensors`, folders at every `--checkpoint`,
`save_pretrained` / `from_pretrained` (offline here: local folders)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import upernet_ref
from upernet_ref import build_model, configs, get_config
from upernet_ref.checkpoints import CheckpointError, read_checkpoint_file, save_checkpoint
from upernet_ref.cli import main as upernet
from upernet_ref.hub import training_command
from upernet_ref.model.upernet import UPerNet, randomize_batchnorm

CFG = get_config("upernet_small_test", ["train.lr=0.1"])  # differs from the named config
EVAL = ["--limit", "6", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trainer-style checkpoint (weights, config, iteration) with non-trivial BatchNorm."""
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(CFG), torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("run") / "last.pt"
    return save_checkpoint({"model": model.state_dict(), "config": configs.to_dict(CFG),
                            "iteration": 7, "max_iters": 10}, path)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(folder, eval JSON of the .pt) after `eval` then `export --format safetensors --eval-json`."""
    base = tmp_path_factory.mktemp("export")
    pt_json = base / "pt.json"
    assert upernet(["eval", "--checkpoint", str(checkpoint), "--json", str(pt_json), *EVAL]) == 0
    folder = base / "hf"
    assert upernet(["export", "--checkpoint", str(checkpoint), "--format", "safetensors",
                    "--out", str(folder), "--eval-json", str(pt_json)]) == 0
    return folder, json.loads(pt_json.read_text())


def test_export_writes_weights_config_and_model_card(exported, checkpoint):
    folder, metrics = exported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                       "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(configs.to_dict(CFG)))
    weights = load_file(folder / "model.safetensors")
    saved = read_checkpoint_file(checkpoint)["model"]
    assert weights.keys() == saved.keys()
    for k in saved:
        assert torch.equal(weights[k], saved[k]), k
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: upernet_ref" in card
    assert "# upernet_small_test" in card and "7 of 10 iterations" in card
    assert f"| mIoU | {100 * metrics['miou']:.2f} |" in card and metrics["protocol"] in card
    assert "--config upernet_small_test" in card and "--train.lr=0.1" in card  # the command
    assert "## Licence" in card and "demo scenes" in card


def test_eval_of_the_folder_gives_the_mIoU_of_the_pt(exported, tmp_path):
    folder, from_pt = exported
    for checkpoint in (folder, folder / "model.safetensors"):  # the folder, or its file alone
        out = tmp_path / f"{checkpoint.name}.json"
        assert upernet(["eval", "--checkpoint", str(checkpoint), "--json", str(out), *EVAL]) == 0
        from_folder = json.loads(out.read_text())
        assert from_folder["miou"] == from_pt["miou"] and from_folder["iou"] == from_pt["iou"]
    assert any(v and v > 0 for v in from_pt["iou"])  # a comparison of something, not of zeros


def test_from_pretrained_gives_identical_logits(exported, checkpoint):
    folder, _ = exported
    model = upernet_ref.from_pretrained(folder)
    assert isinstance(model, UPerNet) and not model.training
    assert configs.to_dict(model.config) == configs.to_dict(CFG)
    reference = build_model(CFG)
    reference.load_state_dict(read_checkpoint_file(checkpoint)["model"])
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], reference.eval()(x)["out"])


def test_save_pretrained_and_from_pretrained_are_huggingface_hub_s(tmp_path):
    model = randomize_batchnorm(build_model(CFG), torch.Generator().manual_seed(2)).eval()
    model.save_pretrained(tmp_path / "m")  # the mixin's own method, nothing else called
    assert (tmp_path / "m" / "README.md").read_text().count("# upernet_small_test") == 1
    again = UPerNet.from_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x)["out"], model(x)["out"])
    assert callable(model.push_to_hub)  # the hub upload (not run: this machine is offline)


def test_a_folder_and_its_safetensors_file_start_training(exported, tmp_path, capsys):
    folder, _ = exported
    for weights in (folder, folder / "model.safetensors"):
        out = tmp_path / weights.name
        assert upernet(["train", "--config", "upernet_small_test", "--out", str(out),
                        "--weights", str(weights), "--max-iters", "1", "--no-val",
                        "--no-progress"]) == 0, capsys.readouterr().err
    # and predict takes the folder too
    image = tmp_path / "photo.png"
    torch.manual_seed(0)
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(image)
    assert upernet(["predict", "--checkpoint", str(folder), "--out", str(tmp_path / "p"),
                    str(image)]) == 0
    assert (tmp_path / "p" / "photo.png").is_file()


def test_bad_folders_and_metrics_are_one_line(exported, tmp_path, capsys, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert upernet(["eval", "--checkpoint", str(empty), *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"upernet eval: error: {empty}: no model.safetensors") and "\n" not in err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert upernet(["export", "--checkpoint", str(checkpoint), "--format", "safetensors",
                    "--out", str(tmp_path / "x"), "--eval-json", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upernet export: error:") and "miou" in err and "\n" not in err
    with pytest.raises(CheckpointError, match="not a model folder"):
        upernet_ref.from_pretrained(tmp_path / "missing")


def test_training_command_reproduces_the_configuration():
    cfg = get_config("upernet_small_demo", ["data.dataset=voc", "data.num_classes=21",
                                            "data.crop_size=48x48"])
    command = training_command(cfg, max_iters=20)
    args = command.replace("\\\n", " ").split()
    overrides = [a[2:] for a in args if a.startswith("--") and "=" in a]
    assert "--max-iters" in args and "--data-root" in args
    assert configs.to_dict(get_config("upernet_small_demo", overrides)) == configs.to_dict(cfg)
