"""Checkpoint files: reading published ones, converting their names, saving ours atomically.

Three layouts exist for the same network (docs/SPEC.md, "Checkpoint layouts"):
- sssegmentation (the published table): `backbone_net.*`, `ppm_net.*`, `lateral_convs.*`,
  `fpn_convs.*`, `decoder.{0,1,4}`, `auxiliary_decoder.{0,1,4}`; files are `torch.save`d dicts
  whose "model" entry is the state_dict.
- mmsegmentation: `backbone.*`, `decode_head.{psp_modules,bottleneck,lateral_convs,fpn_convs,
  fpn_bottleneck,conv_seg}`, `auxiliary_head.{convs.0,conv_seg}`; files hold "state_dict".
- torchvision ImageNet ResNets (`conv1`, `bn1`, `layerN`, `fc`): a backbone with the plain stem.

`convert_state_dict` renames any of them to this package's names; `load_weights` reads a file as
published (a dict with "model" or "state_dict", or a bare state_dict, "module." prefixes) and
loads it strictly, failing with a message that lists missing and unexpected keys and shape
mismatches (`reinit_classifier=True` fine-tunes into another class count). `save_checkpoint`
writes through a temporary file and a rename, so a crash while saving never destroys the
previous checkpoint.

Opening a file never runs code from it. A `.pt`/`.pth` file is a pickle, and a pickle can name
any Python function to call while it is read (`os.system` included); the checkpoints this project
points users to come from third parties. So every file is read with
`torch.load(weights_only=True)`, whose unpickler only rebuilds tensors and plain containers
(dicts, lists, tuples, numbers, strings), plus numpy arrays of plain numbers for files written
before our RNG snapshots became tensors. A file that needs anything else is refused, naming what
it needs; `trust=True` (`--trust-checkpoint`) opens it with the full unpickler, with a warning, for
a file whose source the user trusts. Hugging Face folders (`model.safetensors` + `config.json`)
and `.safetensors` files hold raw tensors only and are read with `safetensors`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import typing
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch
from torch import nn

from upernet_ref import configs
from upernet_ref.config_files import from_dict
from upernet_ref.errors import UperNetError
from upernet_ref.extras import require
from upernet_ref.files import atomic_write
from upernet_ref.training.runtime import non_finite_tensors

_log = logging.getLogger(__name__)

SOURCES = ("upernet_ref", "sssegmentation", "mmsegmentation", "torchvision", "mmcls")


class CheckpointError(UperNetError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


# The Hugging Face layout (huggingface_hub's constants): a folder with these two files.
SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The two 1x1 convs whose output channels are the classes (the paper's per-pixel classifiers).
CLASSIFIERS = ("decode_head.classifier.", "aux_head.classifier.")


# (pattern, replacement) pairs, applied first match wins, per source.
_RULES: dict[str, list[tuple[str, str]]] = {
    "sssegmentation": [
        (r"^backbone_net\.", "backbone."),
        (r"^ppm_net\.branches\.(\d+)\.1\.", r"decode_head.ppm.branches.\1.conv."),
        (r"^ppm_net\.branches\.(\d+)\.2\.", r"decode_head.ppm.branches.\1.bn."),
        # the 2020 release calls the PPM's fusion conv `fuse_layer`, later ones `bottleneck`
        (r"^ppm_net\.(?:bottleneck|fuse_layer)\.0\.", "decode_head.ppm.bottleneck.conv."),
        (r"^ppm_net\.(?:bottleneck|fuse_layer)\.1\.", "decode_head.ppm.bottleneck.bn."),
        (r"^(lateral_convs|fpn_convs)\.(\d+)\.0\.", r"decode_head.\1.\2.conv."),
        (r"^(lateral_convs|fpn_convs)\.(\d+)\.1\.", r"decode_head.\1.\2.bn."),
        (r"^decoder\.0\.", "decode_head.fuse.conv."),
        (r"^decoder\.1\.", "decode_head.fuse.bn."),
        (r"^decoder\.4\.", "decode_head.classifier."),
        (r"^auxiliary_decoder\.0\.", "aux_head.conv.conv."),
        (r"^auxiliary_decoder\.1\.", "aux_head.conv.bn."),
        (r"^auxiliary_decoder\.4\.", "aux_head.classifier."),
    ],
    "mmsegmentation": [
        (r"^backbone\.", "backbone."),
        (r"^decode_head\.psp_modules\.(\d+)\.1\.", r"decode_head.ppm.branches.\1."),
        (r"^decode_head\.bottleneck\.", "decode_head.ppm.bottleneck."),
        (r"^decode_head\.(lateral_convs|fpn_convs)\.", r"decode_head.\1."),
        (r"^decode_head\.fpn_bottleneck\.", "decode_head.fuse."),
        (r"^decode_head\.conv_seg\.", "decode_head.classifier."),
        (r"^auxiliary_head\.convs\.0\.", "aux_head.conv."),
        (r"^auxiliary_head\.conv_seg\.", "aux_head.classifier."),
    ],
    "torchvision": [(r"^", "backbone.")],
    # open-mmlab's ImageNet v1c backbones (resnet50_v1c): `stem.*`, `layerN.*`, `fc.*`
    "mmcls": [(r"^", "backbone.")],
}
# keys a source carries that have no counterpart here (dropped, not reported as unexpected)
# (the ImageNet classifier `fc` has no place in a segmentation model)
_DROP = {"mmsegmentation": (), "sssegmentation": (), "torchvision": ("fc.",), "mmcls": ("fc.",)}


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove a DataParallel/DDP `module.` (or any) prefix from every key that has it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def detect_source(state_dict: Mapping[str, Any]) -> str:
    """Which layout a state_dict uses, from its key names."""
    keys = list(state_dict)
    if any(k.startswith(("backbone_net.", "ppm_net.", "auxiliary_decoder.")) for k in keys):
        return "sssegmentation"
    if any(k.startswith(("decode_head.psp_modules.", "decode_head.conv_seg", "auxiliary_head."))
           for k in keys):
        return "mmsegmentation"
    if any(k.startswith(("backbone.", "decode_head.", "aux_head.")) for k in keys):
        return "upernet_ref"
    if any(k.startswith("layer1.") for k in keys):
        if "conv1.weight" in state_dict:
            return "torchvision"
        if any(k.startswith("stem.") for k in keys):
            return "mmcls"
    raise CheckpointError("cannot tell which layout this state_dict uses; first keys: "
                          + ", ".join(keys[:5]))


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "auto") -> dict[str, Any]:
    """Rename a published state_dict's keys to this package's module names.

    Args:
        state_dict: the weights (already unwrapped from the file's dict).
        source: "sssegmentation", "mmsegmentation", "torchvision", "upernet_ref" or "auto".
    Returns:
        A state_dict for `build_model(...)` (for "torchvision", keys start with `backbone.`:
        the backbone with the plain stem; the ImageNet `fc` layer is dropped).
    """
    state_dict = strip_prefix(state_dict)
    if source == "auto":
        source = detect_source(state_dict)
    if source == "upernet_ref":
        return dict(state_dict)
    if source not in _RULES:
        raise ValueError(f"source must be one of {SOURCES} or 'auto', got {source!r}")
    rules = [(re.compile(p), r) for p, r in _RULES[source]]
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith(_DROP[source]):
            continue
        new = key
        for pattern, replacement in rules:
            if pattern.search(key):
                new = pattern.sub(replacement, key, count=1)
                break
        out[new] = value
    return out


# Globals `torch.load(weights_only=True)` may call besides its defaults: numpy's array
# reconstruction, which the RNG snapshots of checkpoints written before 2026-12 contain
# (numpy's MT19937 key array). They rebuild arrays of plain numbers and run nothing else;
# numpy 1.x pickles name the module `numpy.core`, numpy 2.x `numpy._core`.
def _numpy_array_globals() -> list:
    import numpy as np
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct")]


TRUST_HINT = ("if you trust where the file comes from, pass --trust-checkpoint (trust=True in "
              "Python), or convert it once to a safe folder: upernet export --checkpoint FILE "
              "--trust-checkpoint --format safetensors --out DIR [--config NAME]")


def _refused_globals(path: Path) -> list[str] | None:
    """What a pickle `weights_only` refused would call, read from its opcodes (nothing is
    executed); None when the file is not a pickle at all (junk, or truncated)."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):  # torch.save's format: the pickle is data.pkl inside
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            return None
    else:  # legacy torch.save (several pickles in a row) or a plain pickle
        names, strings, complete = [], [], 0
        with open(path, "rb") as f:
            for _ in range(5):
                try:
                    for op, arg, _ in pickletools.genops(f):
                        if op.name == "GLOBAL":  # "module name"
                            names.append(arg.replace(" ", "."))
                        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # after 2 strings
                            names.append(".".join(strings[-2:]))
                        elif isinstance(arg, str):
                            strings.append(arg)
                    complete += 1
                except Exception:  # the raw tensor data after the pickles, or junk
                    break
        if not complete:
            return None
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
               for g in _numpy_array_globals()}
    safe_prefixes = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")
    return list(dict.fromkeys(n for n in names if n not in allowed and not n.startswith(safe_prefixes)))


# --------------------------------------------------------------------------------------------
# Integrity: a file changed after it was written (bit flips, a bad copy) is refused, not read

DIGEST_KEY = "sha256"  # our .pt checkpoints' entry, and the safetensors metadata key


def tensor_digest(obj: Any) -> str:
    """SHA-256 of every tensor in a (nested) checkpoint: each one's place, dtype, shape and
    bytes, in a fixed order. Written with every checkpoint and model folder this project
    saves and compared when they are read: the zip CRC of a .pt file is not checked by
    torch's reader, and safetensors files have no checksum at all."""
    digest = hashlib.sha256()

    def visit(x: Any, place: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{place}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, Mapping):
            for key in sorted(x, key=str):
                visit(x[key], f"{place}/{key}")
        elif isinstance(x, (list, tuple)):
            for i, item in enumerate(x):
                visit(item, f"{place}/{i}")

    visit(obj, "")
    return digest.hexdigest()


def _check_zip(path: Path) -> None:
    """The CRC of every record of a torch.save zip (torch's reader does not check them)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy format (or not a torch file: torch.load says so)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # a damaged directory: BadZipFile, EOFError, zlib.error, ...
        raise CheckpointError(f"{path}: damaged checkpoint, its zip structure does not read "
                              f"({_first_line(err)}); use another copy") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint, {bad} fails its CRC check (changed "
                              f"after it was written: a bad copy or disk?); use another copy")


def _check_digest(obj: Any, stored: Any, path: Path) -> None:
    if stored is not None and stored != tensor_digest(obj):
        raise CheckpointError(f"{path}: damaged checkpoint, its tensors' SHA-256 differs from the "
                              f"one stored when it was written; use another copy")


def read_checkpoint_file(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """The whole dict stored in a checkpoint, without running code from it.

    Args:
        path: a `torch.save`d file (ours, sssegmentation's, mmsegmentation's, torchvision's), a
            Hugging Face folder (`model.safetensors` + `config.json`) or a `.safetensors` file.
        trust: for a pickle that `weights_only` refuses (it names Python objects to build),
            open it with the full unpickler anyway, after a warning on stderr. That runs any
            code the file names: only for files from a source you trust.
    Returns:
        The stored dict; for a folder or `.safetensors` file `{"model": state_dict}` plus
        `"config"` when a `config.json` is there.
    Raises:
        CheckpointError: one line naming the file and the problem.
    """
    if not os.path.exists(path) and is_hub_id(str(path)):  # "user/name": a Hub model folder
        path = download_model_folder(str(path))
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return _read_safetensors(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_zip(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the error says it
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = _refused_globals(path)
        if names is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch "
                                  f"file?)") from None
        needs = (f"would call {', '.join(names[:5])}{' and more' if len(names) > 5 else ''}"
                 if names else "needs more than tensors and plain data")
        if not trust:
            raise CheckpointError(f"{path}: refused to open: it is a pickle that {needs} while "
                                  f"loading, which could run any code; {TRUST_HINT}") from None
        _log.warning(f"warning: {path}: --trust-checkpoint: opening it with the full "
                    f"unpickler; it {needs}, and whatever code the file names runs")
        obj = _load_trusted(path)
    except Exception as err:  # truncated, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch "
                              f"file?): {_first_line(err)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    _check_digest(obj, obj.pop(DIGEST_KEY, None), path)  # file metadata, not content
    return obj


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The configuration and iteration of one of our .pt checkpoints, its tensors left on disk
    (`torch.load` with mmap): what `upernet train` checks before a run starts. {} when the file
    does not read that way; `read_checkpoint_file` then says why, when it loads the file."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    return {k: obj[k] for k in ("config", "iteration", "max_iters") if k in obj} \
        if isinstance(obj, dict) else {}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


def is_hub_id(name: str) -> bool:
    """'user/name' (one slash, no file suffix, no path that exists): a Hugging Face Hub id."""
    return (bool(_HUB_ID.fullmatch(name)) and not name.endswith(_FILE_SUFFIXES)
            and ".." not in name and not os.path.exists(name))


def download_model_folder(repo_id: str, revision: str | None = None, **download: Any) -> Path:
    """The model folder of a Hub repository (its model.safetensors and config.json), from the
    Hugging Face cache or downloaded into it. `download`: `snapshot_download`'s cache_dir,
    token, local_files_only. Raises CheckpointError in one line: offline, no such repository,
    no model folder in it (and how to work offline)."""
    hf = require("huggingface_hub", "hf", f"the Hub id {repo_id}")
    try:
        folder = Path(hf.snapshot_download(repo_id, revision=revision,
                                        allow_patterns=[SAFETENSORS_NAME, CONFIG_NAME],
                                        **download))
    except Exception as err:
        kinds = {c.__name__ for c in type(err).__mro__}
        if kinds & {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
            raise CheckpointError(f"{repo_id}: no such file or folder here, and no such Hugging "
                                  f"Face Hub repository{f' at revision {revision}' if revision else ''}"
                                  f" (or no access: log in with `hf auth login`)") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else
               f"the Hugging Face Hub could not be reached and it is not in the cache "
               f"({type(err).__name__})")
        raise CheckpointError(f"{repo_id}: no such file or folder here; as a Hub id: {why}; to "
                              f"work offline, download it once where the Hub is reachable "
                              f"(`hf download {repo_id}`), then set HF_HUB_OFFLINE=1, or pass a "
                              f"local model folder") from None
    if not (folder / SAFETENSORS_NAME).is_file():
        raise CheckpointError(f"{repo_id}: this Hub repository has no {SAFETENSORS_NAME} (not "
                              f"an upernet_ref model folder)")
    return folder


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    line = line[:157] + "..." if len(line) > 160 else line
    return f"{type(err).__name__}: {line}"


def _load_trusted(path: Path) -> Any:
    """The full unpickler, for a file the user said they trust (never the default)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint: {_first_line(err)}") from None


def _read_safetensors(path: Path) -> dict[str, Any]:
    """`{"model": tensors, "config": config.json}` of a Hugging Face folder or .safetensors file."""
    from safetensors import safe_open

    weights = path / SAFETENSORS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {SAFETENSORS_NAME} in this folder (a model folder "
                              f"holds {SAFETENSORS_NAME} and {CONFIG_NAME}; write one with "
                              f"upernet export --format safetensors)" if path.is_dir()
                              else f"{path}: no such checkpoint file")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            obj: dict[str, Any] = {"model": {key: f.get_tensor(key) for key in f.keys()}}
    except Exception as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file: {_first_line(err)}"
                              ) from None
    _check_digest(obj["model"], metadata.get(DIGEST_KEY), weights)
    config_file = weights.parent / CONFIG_NAME
    if config_file.is_file():
        try:
            obj["config"] = json.loads(config_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_file}: not valid JSON: {err}") from None
    return obj


def stored_config(state: Mapping[str, Any], path: str | os.PathLike) -> configs.Config | None:
    """The configuration stored with a checkpoint (our checkpoints' "config", a model folder's
    config.json), checked field by field like any configuration (`config_files.from_dict`, messages
    naming the file); None when it stores none."""
    config = state.get("config") if isinstance(state, Mapping) else None
    if config is None:
        return None
    path = Path(path)
    where = path / CONFIG_NAME if path.is_dir() else (
        path.with_name(CONFIG_NAME) if path.suffix == ".safetensors" else path)
    return from_dict(config, where=str(where))


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint dict: its "model" or "state_dict" entry, or itself."""
    for key in ("model", "state_dict", "model_state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError("no state_dict found (looked for 'model', 'state_dict' or a bare "
                          f"dict of tensors); top-level keys: {list(obj)[:10]}")


def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     where: str = "checkpoint") -> None:
    """Raise a CheckpointError listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    classifiers = [k for k in expected if k.endswith(("classifier.weight", "classifier.bias"))]
    if not missing and not unexpected and mismatched and all(
            m.split(":")[0] in classifiers for m in mismatched):  # only the class count differs
        key = next(k for k in classifiers if k in state_dict)
        have, want = state_dict[key].shape[0], expected[key].shape[0]
        raise CheckpointError(
            f"{where} was trained for {have} classes, the model has {want}: give the "
            f"configuration it was trained with (--config), or fine-tune into {want} classes "
            f"with --reinit-classifier (reinit_classifier=True in Python)")
    if missing or unexpected or mismatched:
        def block(title: str, items: list[str]) -> str:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            return f"  {title} ({len(items)}):\n    {shown}" if items else ""
        parts = [block("missing keys", missing), block("unexpected keys", unexpected),
                 block("shape mismatches", mismatched)]
        raise CheckpointError(f"{where} does not fit the model:\n" + "\n".join(p for p in parts if p))


def _converted(checkpoint: str | os.PathLike | Mapping[str, Any], source: str,
               where: str | None = None, trust: bool = False
               ) -> tuple[str, dict[str, Any], Any]:
    """(name for messages, state_dict in this package's names, its stored "config" or None)
    of a file, folder or dict.

    A state_dict with NaN / inf weights or BatchNorm statistics (a diverged run) is refused,
    naming the tensors: it would load and then predict garbage.
    """
    is_file = isinstance(checkpoint, (str, os.PathLike))
    where = where or (str(checkpoint) if is_file else "checkpoint")
    obj = read_checkpoint_file(checkpoint, trust) if is_file else checkpoint
    try:
        state_dict = convert_state_dict(extract_state_dict(obj), source)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    bad = non_finite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold NaN or inf values (a diverged "
                              f"run?): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
    return where, state_dict, obj.get("config") if isinstance(obj, Mapping) else None


def differences(old: configs.Config, new: configs.Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every field that differs, in the sections' order."""
    a, b = configs.to_dict(old), configs.to_dict(new)
    return [(f"{s}.{k}", a[s][k], v) for s in ("model", "data", "train", "test")
            for k, v in b[s].items() if a[s][k] != v]


def _other_configuration(saved: Any, model: nn.Module, where: str) -> CheckpointError | None:
    """The short message for weights trained with another model configuration than `model`'s
    (instead of a list of shape mismatches): both names, the first fields that differ, the fix.
    None when that is not the cause (no stored config, or only the class count differs)."""
    ours = getattr(model, "config", None)
    if not isinstance(saved, dict) or not isinstance(ours, configs.Config):
        return None
    try:
        theirs = from_dict(saved, where=None)
    except (configs.ConfigError, configs.ConfigKeyError):
        return None
    diffs = [f"{key} {a!r} vs {b!r}" for key, a, b in differences(theirs, ours)
             if key.startswith("model.")]
    if not diffs:
        return None
    return CheckpointError(
        f"{where} was trained as {theirs.name}, the model asked for is {ours.name}; they differ "
        f"in {', '.join(diffs[:3])}{' and more' if len(diffs) > 3 else ''}\n"
        f"leave out --config to use the checkpoint's own configuration (or give --config "
        f"{theirs.name} and the model overrides it was trained with)")


def _num_classes(state_dict: Mapping[str, Any]) -> int | None:
    weight = state_dict.get("decode_head.classifier.weight")
    return int(weight.shape[0]) if weight is not None else None


def load_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any],
                 source: str = "auto", strict: bool = True, where: str | None = None,
                 reinit_classifier: bool = False, trust: bool = False,
                 log: typing.Callable[[str], None] | None = None) -> nn.Module:
    """Load a checkpoint (file, Hugging Face folder, checkpoint dict or state_dict) into `model`.

    Accepts our training checkpoints, our `save_pretrained` folders and `.safetensors` files, and
    the published sssegmentation / mmsegmentation files as they are released. Strict: every key
    must fit, a class-count mismatch is refused in one line naming both counts, and a state_dict
    with NaN / inf tensors is refused.

    Args:
        strict: False loads only the keys present in both (shape mismatches still fail).
        where: names a dict in messages (default: the file's path, or "checkpoint").
        reinit_classifier: load everything but the two classifiers (`decode_head.classifier`,
            `aux_head.classifier`) and re-initialise those, so that weights trained on one label
            set (ADE20K's 150 classes) fine-tune into the model's `num_classes` (smp's
            `strict=False`, transformers' `ignore_mismatched_sizes`). Says so through `log`.
        trust: see `read_checkpoint_file` (opening a pickle that needs more than plain data).
        log: where the one-line note of `reinit_classifier` goes (default: stderr).
    Returns:
        The model.
    """
    where, state_dict, saved = _converted(checkpoint, source, where, trust)
    try:
        _load(model, state_dict, where, strict=strict, reinit_classifier=reinit_classifier, log=log)
    except CheckpointError as err:
        raise (_other_configuration(saved, model, where) or err) from None
    return model


def _load(model: nn.Module, state_dict: dict[str, Any], where: str, *, strict: bool,
          reinit_classifier: bool, log: typing.Callable[[str], None] | None) -> None:
    """`load_weights` once the state_dict is read and converted."""
    expected = model.state_dict()
    wrong = [f"{k} {v.dtype} (model {expected[k].dtype})" for k, v in state_dict.items()
             if k in expected and isinstance(v, torch.Tensor)
             and v.is_floating_point() != expected[k].is_floating_point()]
    if wrong:  # load_state_dict would cast them (an int tensor of weights, a float counter)
        raise CheckpointError(f"{where}: {len(wrong)} tensor(s) are integers where the model "
                              f"has floats or the reverse, refused rather than cast (a damaged "
                              f"or foreign file?): {', '.join(wrong[:3])}"
                              f"{', ...' if len(wrong) > 3 else ''}")
    have, want = _num_classes(state_dict), _num_classes(model.state_dict())
    if reinit_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIERS)}
        for name in ("decode_head", "aux_head"):
            head = getattr(model, name, None)
            if head is not None:
                head.classifier.reset_parameters()  # a fresh layer, as build_model makes it
        expected = model.state_dict()
        if not strict:
            state_dict = {k: v for k, v in state_dict.items() if k in expected}
        kept = expected if not strict else {k: v for k, v in expected.items()
                                            if k.startswith(CLASSIFIERS)}
        check_compatible(model, {**kept, **state_dict}, where)
        model.load_state_dict(state_dict, strict=False)
        trained_on = f"{have} classes" if have is not None else "no classifier"
        (log or _log.info)(
            f"{where}: loaded all weights but the classifiers (checkpoint: {trained_on}); "
            f"decode_head.classifier and aux_head.classifier re-initialised for {want} classes")
        return
    if strict:
        check_compatible(model, state_dict, where)
        model.load_state_dict(state_dict, strict=True)
    else:
        expected = model.state_dict()
        subset = {k: v for k, v in state_dict.items() if k in expected}
        check_compatible(model, {**expected, **subset}, where)
        model.load_state_dict(subset, strict=False)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class _Writer:
    """A file's `write` that remembers the OSError it raised: torch's zip writer reports a full
    disk as "[enforce fail at inline_container.cc] unexpected pos ...", losing the cause."""

    def __init__(self, file: typing.BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:,.0f} KB"


def _save_failure(path: Path, err: BaseException, obj: Any) -> CheckpointError:
    """A one-line CheckpointError saying why `path` could not be written and what it needs."""
    needed = _tensor_bytes(obj)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    number = err.errno if isinstance(err, OSError) else None
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    if number == errno.ENOSPC or (number is None and free is not None and free < needed):
        return CheckpointError(f"{path}: no space left on the device to save the checkpoint "
                               f"(about {_mb(needed)} needed, {_mb(free or 0)} free){kept}")
    if number == errno.EDQUOT:
        return CheckpointError(f"{path}: disk quota exceeded saving the checkpoint (about "
                               f"{_mb(needed)} needed){kept}")
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CheckpointError(f"{path}: cannot write the checkpoint there ({err.strerror}); "
                               f"give a writable --out{kept}")
    reason = (err.strerror if isinstance(err, OSError) and err.strerror
              else (str(err).strip().splitlines() or [type(err).__name__])[0][:200])
    return CheckpointError(f"{path}: the checkpoint could not be saved ({reason}){kept}")


# `files.atomic_write`'s temporary files: .NAME.PID.XXXXXXXX.tmp (the pid tells a live save from a
# killed one); .NAME.XXXXXXXX.tmp from before the pid was in the name; .NAME.PID.part, written by
# versions before atomic_write used mkstemp (a curves.png killed midway, ...).
_TEMPORARY = re.compile(r"\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.tmp"
                        r"|\.(?P<part>.+?)\.(?P<part_pid>\d+)\.part")


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` through `files.atomic_write` (temporary file, fsync, rename), with the
    digest of its tensors (`tensor_digest`, checked by `read_checkpoint_file`).

    A crash, a kill or a full disk while writing leaves the previous file at `path` untouched.
    A write that fails (no space, quota, permission) raises a one-line `CheckpointError` with
    the path and the size needed, after removing its temporary file; a killed save's file is
    removed by `remove_stale_temporary_files` at the next start. The file gets the usual
    permissions (the umask's), not mkstemp's owner-only 0600.
    """
    if isinstance(obj, Mapping):
        obj = {**obj, DIGEST_KEY: tensor_digest(obj)}
    return _write_atomically(Path(path), obj, lambda f: torch.save(obj, f))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """A model folder's `model.safetensors`, written like `save_checkpoint` (atomic, the usual
    permissions), with the digest of its tensors in the file's metadata (and the Hub's
    `format: pt`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = save(tensors, metadata={"format": "pt", DIGEST_KEY: tensor_digest(tensors)})
    return _write_atomically(Path(path), tensors, lambda f: f.write(data))


def _write_atomically(path: Path, obj: Any, write_to: typing.Callable[[typing.Any], Any]) -> Path:
    """`write_to(file)` through `atomic_write`; a failure as `_save_failure`'s one line."""
    writers: list[_Writer] = []

    def write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            writers.append(_Writer(f))
            write_to(writers[0])

    try:
        return atomic_write(path, write)
    except Exception as err:  # not KeyboardInterrupt / SystemExit
        cause = writers[0].error if writers and writers[0].error else err
        raise _save_failure(path, cause, obj) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of saves (`atomic_write`) that were killed midway (a full
    checkpoint each, otherwise never removed); files of saves still running are kept.
    Returns the files removed."""
    removed = []
    for candidate in [*Path(folder).glob(".*.tmp"), *Path(folder).glob(".*.part")]:
        match = _TEMPORARY.fullmatch(candidate.name)
        pid = match and (match["pid"] or match["part_pid"])
        if match is None or (pid and _process_alive(int(pid))):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def load_backbone_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any],
                          source: str = "auto", trust: bool = False) -> nn.Module:
    """Initialise `model.backbone` from ImageNet weights (torchvision, or open-mmlab's v1c).

    Only the backbone's keys are used, and all of them must be there (strict). A torchvision
    ResNet fits the plain stem (`model.stem="plain"`), resnet50_v1c the deep one. `trust`: see
    `read_checkpoint_file`.
    """
    where, state_dict, _ = _converted(checkpoint, source, trust=trust)
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    check_compatible(model.backbone, backbone, where)
    model.backbone.load_state_dict(backbone, strict=True)
    return model
