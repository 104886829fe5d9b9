"""Checkpoint files: reading published ones, converting their names, saving ours atomically.

Three layouts exist for the same network (spec section 2):
- sssegmentation (the published table): `backbone_net.*`, `ppm_net.*`, `lateral_convs.*`,
  `fpn_convs.*`, `decoder.{0,1,4}`, `auxiliary_decoder.{0,1,4}`; files are `torch.save`d dicts
  whose "model" entry is the state_dict.
- mmsegmentation: `backbone.*`, `decode_head.{psp_modules,bottleneck,lateral_convs,fpn_convs,
  fpn_bottleneck,conv_seg}`, `auxiliary_head.{convs.0,conv_seg}`; files hold "state_dict".
- torchvision ImageNet ResNets (`conv1`, `bn1`, `layerN`, `fc`): a backbone with the plain stem.

`convert_state_dict` renames any of them to this package's names; `load_weights` reads a file as
published (a dict with "model" or "state_dict", or a bare state_dict, "module." prefixes) and
loads it strictly, failing with a message that lists missing and unexpected keys and shape
mismatches. `save_checkpoint` writes through a temporary file and a rename, so a crash while
saving never destroys the previous checkpoint.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from upernet_ref.errors import UperNetError

SOURCES = ("upernet_ref", "sssegmentation", "mmsegmentation", "torchvision", "mmcls")


class CheckpointError(UperNetError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


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


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The whole dict stored in a checkpoint file, with a clear error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...
        first_line = (str(err).strip().splitlines() or [""])[0]
        if len(first_line) > 160:
            first_line = first_line[:157] + "..."
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch "
                              f"file?): {type(err).__name__}: {first_line}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


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
        raise CheckpointError(
            f"{where} was trained for {state_dict[key].shape[0]} classes, the model has "
            f"{expected[key].shape[0]}: give the configuration it was trained with (--config), "
            f"or --data.num_classes={state_dict[key].shape[0]} for your own data")
    if missing or unexpected or mismatched:
        def block(title: str, items: list[str]) -> str:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            return f"  {title} ({len(items)}):\n    {shown}" if items else ""
        parts = [block("missing keys", missing), block("unexpected keys", unexpected),
                 block("shape mismatches", mismatched)]
        raise CheckpointError(f"{where} does not fit the model:\n" + "\n".join(p for p in parts if p))


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state_dict` holding a NaN or an infinity."""
    return [k for k, v in state_dict.items() if isinstance(v, torch.Tensor)
            and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _converted(checkpoint: str | os.PathLike | Mapping[str, Any], source: str,
               where: str | None = None) -> tuple[str, dict[str, Any]]:
    """(name for messages, state_dict in this package's names) of a file or dict.

    A state_dict with NaN / inf weights or BatchNorm statistics (a diverged run) is refused,
    naming the tensors: it would load and then predict garbage.
    """
    is_file = isinstance(checkpoint, (str, os.PathLike))
    where = where or (str(checkpoint) if is_file else "checkpoint")
    obj = read_checkpoint_file(checkpoint) if is_file else checkpoint
    try:
        state_dict = convert_state_dict(extract_state_dict(obj), source)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    bad = non_finite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold NaN or inf values (a diverged "
                              f"run?): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
    return where, state_dict


def load_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any],
                 source: str = "auto", strict: bool = True, where: str | None = None) -> nn.Module:
    """Load a checkpoint (file path, checkpoint dict or state_dict) into `model`, strictly.

    Accepts our training checkpoints and the published sssegmentation / mmsegmentation files
    as they are released. With `strict=False` only keys present in both are loaded (shape
    mismatches still fail); one with NaN / inf tensors is refused. `where` names a dict in
    messages (default: the file's path, or "checkpoint"). Returns the model.
    """
    where, state_dict = _converted(checkpoint, source, where)
    if strict:
        check_compatible(model, state_dict, where)
        model.load_state_dict(state_dict, strict=True)
    else:
        expected = model.state_dict()
        subset = {k: v for k, v in state_dict.items() if k in expected}
        check_compatible(model, {**expected, **subset}, where)
        model.load_state_dict(subset, strict=False)
    return model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` through a temporary file in the same folder and an atomic rename.

    A crash (or a full disk) while writing leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_backbone_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any],
                          source: str = "auto") -> nn.Module:
    """Initialise `model.backbone` from ImageNet weights (torchvision, or open-mmlab's v1c).

    Only the backbone's keys are used, and all of them must be there (strict). A torchvision
    ResNet fits the plain stem (`model.stem="plain"`), resnet50_v1c the deep one.
    """
    where, state_dict = _converted(checkpoint, source)
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    check_compatible(model.backbone, backbone, where)
    model.backbone.load_state_dict(backbone, strict=True)
    return model
