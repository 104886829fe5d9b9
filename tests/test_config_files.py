"""Configuration files: `--config` takes a .json / .yaml file as well as a name, read through
the same checked path as the built-in configurations (`from_dict` / `override`), overrides on
top; `upernet configs --dump` writes one; a run folder's and a model folder's config.json are
configuration files."""
from __future__ import annotations

import json

import pytest
import torch

from upernet_ref import build_model, configs, hub
from upernet_ref.cli import main as upernet
from upernet_ref.config_files import from_dict, load_config, read_config_file, write_config_file
from upernet_ref.configs import ConfigError, ConfigKeyError, get_config, override

BASE = "upernet_small_test"


def dumped(capsys, *args: str) -> dict:
    """`upernet configs --dump ...` on stdout, as data."""
    assert upernet(["configs", "--dump", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_dump_then_train_from_the_file_then_from_the_run_folder(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    assert upernet(["configs", "--dump", BASE, "--train.lr=0.02", "--out", str(path)]) == 0
    capsys.readouterr()
    wanted = configs.to_dict(get_config(BASE, ["train.lr=0.02"]))
    assert configs.to_dict(read_config_file(path)) == wanted  # the name too: the dumped one
    run = tmp_path / "run"
    assert upernet(["train", "--config", str(path), "--out", str(run), "--max-iters", "1",
                    "--no-val", "--no-progress"]) == 0, capsys.readouterr().err
    again = tmp_path / "again"
    assert upernet(["train", "--config", str(run / "config.json"), "--train.momentum=0.8",
                    "--out", str(again), "--max-iters", "1", "--no-val", "--no-progress"]) == 0
    stored = json.loads((again / "config.json").read_text())
    assert stored["train"]["lr"] == 0.02 and stored["train"]["momentum"] == 0.8  # file + override


def test_a_base_file_holds_only_what_differs(tmp_path, capsys):
    path = tmp_path / "small.yml"
    path.write_text("base: upernet_small_test\ntrain: {lr: 0.03, amp: bf16}\n"
                    "data: {classes: [a, b, c, d, e, f, g, box]}\n")
    data = dumped(capsys, str(path), "--train.lr=0.5")  # the command line wins
    expected = configs.to_dict(get_config(BASE, {"train.amp": "bf16", "train.lr": 0.5,
                                                 "data.classes": tuple("abcdefg") + ("box",)}))
    assert data == json.loads(json.dumps({**expected, "name": "small"}))  # tuples as lists


def test_a_model_folder_s_config_json_is_a_configuration_file(tmp_path):
    cfg = get_config(BASE, ["train.lr=0.07"])
    folder = hub.save_pretrained(build_model(cfg), tmp_path / "hf")
    stored = json.loads((folder / "config.json").read_text())
    assert "id2label" in stored  # the Hub keys beside the configuration are left aside
    assert configs.to_dict(load_config(folder / "config.json")) == configs.to_dict(cfg)


def test_dump_on_stdout_round_trips_every_published_configuration(capsys):
    for name in configs.list_configs():
        assert from_dict(dumped(capsys, name)) == get_config(name)


def test_bad_files_are_one_line_naming_the_file(tmp_path, capsys):
    cases = {"typo.json": ('{"base": "upernet_small_test", "train": {"lrr": 1}}', "train.lrr"),
             "value.yaml": ("base: upernet_small_test\ntrain: {amp: fp8}\n", "train.amp"),
             "broken.yaml": ("train: [\n", "not valid YAML"),
             "broken.json": ('{"x": 1', "not valid JSON"),
             "base.yaml": ("base: upernet_r9\n", "unknown base configuration 'upernet_r9'"),
             "list.json": ("[1, 2]", "a mapping of sections")}
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text)
        assert upernet(["train", "--config", str(tmp_path / name), "--out",
                        str(tmp_path / "r"), "--max-iters", "1"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"upernet train: error: {tmp_path / name}: ") and "\n" not in err
        assert said in err, (name, err)
    assert not (tmp_path / "r").exists()  # refused before any work
    assert upernet(["configs", "--dump", str(tmp_path / "missing.yaml")]) == 2
    assert "no such configuration file" in capsys.readouterr().err
    with pytest.raises(ConfigKeyError):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="ends with"):
        write_config_file(get_config(BASE), tmp_path / "x.txt")


def test_class_names_are_a_field_and_a_name_may_hold_an_x():
    cfg = override(get_config(BASE), ["data.classes=sky,box,c,d,e,f,g,h"])
    assert cfg.data.classes[:2] == ("sky", "box")  # "x" splits sizes (512x512), not names
    assert override(get_config(BASE), ["data.crop_size=48x64"]).data.crop_size == (48, 64)
    with pytest.raises(ConfigError, match="data.classes names 2 classes"):
        override(get_config(BASE), ["data.classes=a,b"])
    folder_model = build_model(cfg)
    assert hub.hub_config(folder_model.config)["id2label"]["1"] == "box"
    with torch.no_grad():
        assert folder_model.eval()(torch.zeros(1, 3, 32, 32))["out"].shape[1] == 8
