"""The Hugging Face layout: `export --format safetensors`, folders at every `--checkpoint`,
`hub.save_pretrained` / `from_pretrained` / `push_to_hub` (offline here: local folders, the
Hub's download and upload calls replaced by local stand-ins)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import upernet_ref
from upernet_ref import build_model, configs, get_config
from upernet_ref.checkpoints import CheckpointError, read_checkpoint_file, save_checkpoint
from upernet_ref.cli import main as upernet
from upernet_ref import hub
from upernet_ref.data.info import DATASETS
from upernet_ref.hub import training_command
from upernet_ref.course import randomize_batchnorm
from upernet_ref.model.upernet import UPerNet

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
    config = json.loads((folder / "config.json").read_text())
    names = DATASETS["demo"].classes
    assert config.pop("id2label") == {str(i): n for i, n in enumerate(names)}
    assert config.pop("label2id") == {n: i for i, n in enumerate(names)}
    assert config == json.loads(json.dumps(configs.to_dict(CFG)))
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"  # what transformers / the Hub expect
        assert set(f.metadata()) == {"format", "sha256"}  # + the tensors' digest (checkpoints)
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
    assert "## Licence" in card and "demo scenes" in card and "license: mit" in card
    assert f"value: {round(metrics['miou'], 4)}\n" in card  # a fraction, not a percentage
    assert "| classes | 8: sky, ground, disc" in card


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


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = randomize_batchnorm(build_model(CFG), torch.Generator().manual_seed(2)).eval()
    assert not hasattr(model, "save_pretrained")  # a plain nn.Module: the Hub layout is hub.py's
    hub.save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text().count("# upernet_small_test") == 1
    again = hub.from_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x)["out"], model(x)["out"])


def test_push_to_hub_uploads_the_folder_with_its_metrics(tmp_path, monkeypatch):
    """`push_to_hub` (and `upernet export --push-to-hub`) send the three files, the card with
    its metrics; the Hub's API is replaced by a stand-in that keeps what it was given."""
    import huggingface_hub
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            sent["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            sent["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return "https://huggingface.co/me/x/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = build_model(CFG).eval()
    metrics = {"miou": 0.5123, "macc": 0.6, "aacc": 0.7, "split": "val", "protocol": "whole"}
    assert hub.push_to_hub(model, "me/x", metrics=metrics) == "https://huggingface.co/me/x/commit/1"
    assert sent["repo"] == "me/x" and sorted(sent["files"]) == ["README.md", "config.json",
                                                                "model.safetensors"]
    assert b"| mIoU | 51.23 |" in sent["files"]["README.md"]
    sent.clear()
    metrics_file = tmp_path / "eval.json"
    metrics_file.write_text(json.dumps(metrics))
    assert upernet(["export", "--config", "upernet_small_test", "--format", "safetensors",
                    "--out", str(tmp_path / "hf"), "--eval-json", str(metrics_file),
                    "--push-to-hub", "me/y"]) == 0
    assert sent["repo"] == "me/y" and b"| mIoU | 51.23 |" in sent["files"]["README.md"]


def test_checkpoint_and_weights_take_a_hub_id(exported, tmp_path, monkeypatch, capsys):
    """`--checkpoint user/repo` reads the Hub's copy (`snapshot_download`, here a stand-in that
    returns the exported folder as the cache would), and offline it is one line naming
    HF_HUB_OFFLINE."""
    import huggingface_hub
    folder, from_pt = exported
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append((repo_id, kw)) or str(folder))
    out = tmp_path / "hub.json"
    assert upernet(["eval", "--checkpoint", "someone/upernet-demo", "--json", str(out), *EVAL]) == 0
    assert json.loads(out.read_text())["miou"] == from_pt["miou"]
    assert asked[0][0] == "someone/upernet-demo"
    assert set(asked[0][1]["allow_patterns"]) == {"model.safetensors", "config.json"}
    assert isinstance(upernet_ref.from_pretrained("someone/upernet-demo"), UPerNet)
    run = tmp_path / "fine"  # fine-tuned from the Hub id: the exported card names it
    assert upernet(["train", "--config", "upernet_small_test", "--train.lr=0.1", "--weights",
                    "someone/upernet-demo", "--out", str(run), "--max-iters", "1", "--no-val",
                    "--no-progress"]) == 0
    assert upernet(["export", "--checkpoint", str(run / "last.pt"), "--format", "safetensors",
                    "--out", str(tmp_path / "fine_hf")]) == 0
    assert "base_model: someone/upernet-demo" in (tmp_path / "fine_hf" / "README.md").read_text()
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert upernet(["eval", "--checkpoint", "someone/not-cached", *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upernet eval: error: someone/not-cached:") and "\n" not in err
    assert "HF_HUB_OFFLINE" in err and "hf download someone/not-cached" in err
    assert upernet(["eval", "--checkpoint", "runs/missing.pt", *EVAL]) == 2  # a file, not an id
    assert "no such checkpoint file" in capsys.readouterr().err


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
