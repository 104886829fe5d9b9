"""Configuration files and stored configurations: the shell's way in to `configs`.

A configuration lives in the reading core as four checked dataclasses (`upernet_ref/configs.py`).
Outside it, configurations are written down: as JSON or YAML files (`upernet configs --dump`, a
run folder's or model folder's `config.json`, or `base: NAME` plus changes), and as the
"config" entry of a checkpoint. This module reads them back through the same checks:

    cfg = load_config("my.yaml", ["train.amp=bf16"])   # a name or a file, overrides on top
    cfg = from_dict(checkpoint["config"], where=path)   # a stored one (older keys said by name)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from pathlib import Path

import yaml  # PyYAML: configuration files

from upernet_ref.configs import (SECTIONS, Config, ConfigError, ConfigKeyError, field_types,
                                 from_sections, get_config, keys_of, list_configs, override,
                                 to_dict)
from upernet_ref.files import write_text


def load_config(name: str | os.PathLike | Config,
                overrides: typing.Sequence[str] | dict | None = None) -> Config:
    """What `--config` names: a configuration by name (`configs.get_config`), or a
    configuration file (`read_config_file`), with `overrides` applied on top."""
    if isinstance(name, Config) or str(name) in list_configs():
        return get_config(name, overrides)
    if str(name).endswith(CONFIG_SUFFIXES) or os.path.isfile(name):
        return get_config(read_config_file(name), overrides)
    return get_config(str(name), overrides)  # unknown: its message lists the names


# Configuration files: what `to_dict` holds, as JSON or YAML; or a `base` name plus changes

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# written beside the configuration in a model folder's config.json (transformers' names for
# the class names of data.classes / the dataset description): read past, never needed back
_DERIVED_KEYS = ("id2label", "label2id")


def read_config_file(path: str | os.PathLike) -> Config:
    """A configuration file, through the checked path of every configuration (`from_dict`,
    `override`): either a whole configuration (`to_dict`'s keys; a run folder's config.json, a
    model folder's config.json, `upernet configs --dump`), or `base: NAME` plus the sections'
    fields that differ from it, mmsegmentation's `_base_` in one line:

        base: upernet_r50_os8_ade20k
        train: {lr: 0.02, amp: bf16}
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:  # other OSErrors: the commands' one line names the file
        raise ConfigKeyError(f"{path}: no such configuration file (configuration names: "
                             f"{', '.join(list_configs())})") from None
    is_json = path.suffix == ".json"
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: "
                          f"{(str(err).splitlines() or [''])[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a configuration file holds a mapping of sections, got "
                          f"{type(data).__name__}")
    if "base" not in data:
        return from_dict({"name": path.stem, **data}, where=str(path))
    base = data.pop("base")
    if base not in list_configs():
        raise ConfigKeyError(f"{path}: unknown base configuration {base!r}; valid names: "
                             f"{', '.join(list_configs())}")
    changes: dict[str, typing.Any] = {}
    for section, values in data.items():
        if section in ("name", *_DERIVED_KEYS):
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigKeyError(f"{path}: unknown key {section!r}; a file with base holds "
                                 f"name and the sections {', '.join(SECTIONS)} (mappings)")
        changes.update({f"{section}.{key}": value for key, value in values.items()})
    try:
        cfg = override(get_config(base), changes)
    except (ConfigError, ConfigKeyError) as err:
        raise type(err)(f"{path}: {err}") from None
    return dataclasses.replace(cfg, name=str(data.get("name") or path.stem))


def write_config_file(cfg: Config, path: str | os.PathLike) -> Path:
    """`cfg` as a whole configuration file (.json or .yaml by the suffix), written atomically
    (a temporary file renamed over `path`), that `read_config_file(path)` reads back equal."""
    path = Path(path)
    if not path.name.endswith(CONFIG_SUFFIXES):
        raise ConfigError(f"{path}: a configuration file ends with "
                          f"{', '.join(CONFIG_SUFFIXES)}")
    data = to_dict(cfg)
    if path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)  # tuples as lists
    write_text(path, text)
    return path


# Keys that older versions wrote: dropped with a warning naming them (model.num_classes is
# dropped silently when it equals data.num_classes, as every older file has it).
_REMOVED = {"test.batch_size": "the test batch is one image"}


def _warn(message: str) -> None:
    logging.getLogger(__name__).warning(f"warning: {message}")


def from_dict(data: typing.Any, where: str | None = "configuration") -> Config:
    """The `Config` of `to_dict`'s data (a checkpoint's "config", a model folder's config.json):
    the path every stored configuration takes, checked field by field like an override.

    Unknown keys (a typo such as "test.scale") are refused; keys an older version wrote are
    dropped with a warning naming them; a field missing from an older file takes its default,
    said by name. `where` names the file in messages (None: no prefix and no warnings).
    """
    at = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{at}a configuration is a JSON object, got {type(data).__name__}")
    data, sections, model, dat = dict(data), {}, data.get("model"), data.get("data")
    if isinstance(model, dict) and isinstance(dat, dict) and "num_classes" in model:  # older files
        data["model"] = {k: v for k, v in model.items() if k != "num_classes"}
        data["data"] = {"num_classes": model["num_classes"], **dat}
        if data["data"]["num_classes"] != model["num_classes"]:
            raise ConfigError(f"{at}model.num_classes={model['num_classes']!r} differs from data.num_classes="
                              f"{dat['num_classes']!r}: the class count is data.num_classes")
    for section, cls in SECTIONS.items():
        values, fields = data.get(section), field_types(cls)
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{at}no {section!r} section (a JSON object of {cls.__name__} fields), got {values!r}")
        old = [f"{section}.{k}" for k in values if f"{section}.{k}" in _REMOVED]
        unknown = [k for k in values if k not in fields and f"{section}.{k}" not in _REMOVED]
        if unknown:
            raise ConfigKeyError(f"{at}unknown key {section}.{unknown[0]}; valid {section} keys: "
                                 f"{keys_of(section, cls)}")
        missing = [f"{section}.{f}" for f in fields if f not in values and f"{section}.{f}" != "model.num_classes"]
        for key in old if where else ():
            _warn(f"{at}ignoring {key}, written by an older version ({_REMOVED[key]})")
        if missing and where:
            _warn(f"{at}no {', '.join(missing)} (written by an older version?): using the defaults")
        sections[section] = {k: v for k, v in values.items() if k in fields}
    unknown = [k for k in data if k not in ("name", "reported_miou", *SECTIONS, *_DERIVED_KEYS)]
    if unknown:
        raise ConfigKeyError(f"{at}unknown key {unknown[0]!r}; a configuration has name, reported_miou and "
                             f"the sections {', '.join(SECTIONS)}")
    miou = data.get("reported_miou")
    if miou is not None and (isinstance(miou, bool) or not isinstance(miou, (int, float))):
        raise ConfigError(f"{at}reported_miou must be a number or null, got {miou!r}")
    try:
        return from_sections(data.get("name"), sections, miou)
    except ConfigError as err:
        raise ConfigError(f"{at}{err}") from None
