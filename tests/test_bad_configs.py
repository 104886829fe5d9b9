"""Bad configuration values through the real command line (issue 19, item 4; issue 18, item 5):
checked where the configuration is built (by name and overrides, from a checkpoint, from a
model folder's config.json), refused in one line naming the field and the file, exit 2, and
nothing written. A checkpoint of another configuration is refused in a few lines that say so."""
from __future__ import annotations

import json

import pytest
import torch

from upernet_ref import hub
from upernet_ref.configs import get_config, to_dict
from upernet_ref.model import build_model

from helpers_cli import one_line, run


@pytest.mark.parametrize("override, message", [
    ("--train.amp=fp8", "train.amp must be one of 'none', 'bf16', 'fp16', got 'fp8'"),
    ("--data.crop_size=-32,32", "data.crop_size must be positive sizes"),
    ("--train.batch_size=0", "train.batch_size must be positive, got 0"),
    ("--train.lr=nan", "train.lr must be a finite number"),
    ("--data.on_bad=sometimes", "data.on_bad must be 'raise' or 'skip'"),
    ("--test.scales=0,1", "test.scales must be positive values"),
    ("--model.num_classes=5", "model.num_classes follows data.num_classes: give data.num_classes=5"),
    ("--test.scale=1", "unknown override 'test.scale'"),
])
def test_train_refuses_a_bad_value_before_writing_anything(tmp_path, capfd, override, message):
    out = tmp_path / "run"
    code, _, err = run(capfd, ["train", "--config", "upernet_small_test", "--max-iters", "1",
                               "--no-progress", "--out", str(out), override])
    assert code == 2
    one_line(err, "train", message)
    assert not out.exists()  # no config.json, log.jsonl or tb/ of a run that never started


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder (model.safetensors + config.json) of upernet_small_test."""
    torch.manual_seed(0)
    return hub.save_pretrained(build_model("upernet_small_test"),
                               tmp_path_factory.mktemp("hub") / "model")


def with_config(folder, tmp_path, edit):
    """A copy of `folder` whose config.json is changed by `edit(config)`."""
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _set(section, key, value):
    def edit(config):
        config[section][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("data", "num_classes", "8"), "data.num_classes must be int, got str '8'"),
    (_set("data", "num_classes", -5), "data.num_classes must be positive, got -5"),
    (_set("data", "num_classes", 1e9), "data.num_classes must be int, got float"),
    (_set("model", "head_channels", 10 ** 6), "more than this machine's"),
    (lambda c: c.update(model=[1, 2, 3]), "no 'model' section"),
    (lambda c: c.update(model={}), "no 'model' section"),
    (_set("test", "scale", 1.0), "unknown key test.scale; valid test keys: test.mode"),
    (_set("train", "amp", "fp8"), "train.amp must be one of"),
])
def test_eval_refuses_a_bad_config_json_naming_it(folder, tmp_path, capfd, edit, message):
    bad = with_config(folder, tmp_path, edit)
    code, out, err = run(capfd, ["eval", "--checkpoint", str(bad), "--no-progress"])
    assert code == 2
    one_line(err, "eval", message)
    if "machine" not in message:
        assert f"{bad / 'config.json'}: " in err
    assert "evaluating" not in out
    assert sorted(p.name for p in bad.iterdir()) == ["config.json", "model.safetensors"]


def test_a_config_from_an_older_version_loads_and_its_removed_keys_are_named(folder, tmp_path,
                                                                            capfd):
    def older(config):  # what earlier versions wrote: the class count twice, test.batch_size
        config["model"]["num_classes"] = config["data"]["num_classes"]
        config["test"]["batch_size"] = 1
        config["test"]["crop_size"] = config["data"]["crop_size"]
    old = with_config(folder, tmp_path, older)
    code, out, err = run(capfd, ["eval", "--checkpoint", str(old), "--no-progress", "--limit", "1",
                                 "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    assert err.strip() == (f"warning: {old / 'config.json'}: ignoring test.batch_size, written by "
                           f"an older version (the test batch is one image)")


def test_num_classes_and_crop_size_are_stored_once():
    cfg = get_config("upernet_small_test", ["data.num_classes=3", "data.crop_size=48x40"])
    stored = to_dict(cfg)
    assert "num_classes" not in stored["model"] and stored["data"]["num_classes"] == 3
    assert stored["test"]["crop_size"] == () and stored["data"]["crop_size"] == (48, 40)
    assert cfg.model.num_classes == 3 and cfg.test.crop_size == (48, 40)  # what the parts read
    window = get_config("upernet_small_test", ["test.crop_size=16x16"])
    assert window.test.crop_size == (16, 16) and to_dict(window)["test"]["crop_size"] == (16, 16)


def test_a_checkpoint_of_another_configuration_says_so_in_a_few_lines(tmp_path, capfd):
    path = tmp_path / "small_test.pt"
    cfg = get_config("upernet_small_test")
    torch.save({"model": build_model(cfg).state_dict(), "config": to_dict(cfg)}, path)
    code, _, err = run(capfd, ["eval", "--config", "upernet_small_demo", "--checkpoint", str(path),
                               "--no-progress"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) <= 4, err
    assert f"{path} was trained as upernet_small_test, the model asked for is upernet_small_demo" in lines[0]
    assert "model.base_width 8 vs 16" in lines[0]
    assert "leave out --config to use the checkpoint's own configuration" in err
