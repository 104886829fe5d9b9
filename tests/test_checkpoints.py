"""Published checkpoint layouts convert and load strictly; saving is atomic."""
import json
import os
import stat

import pytest
import torch
import torchvision

from upernet_ref import build_model, get_config
from upernet_ref.model.backbone import ResNet
from upernet_ref.course import randomize_batchnorm
from upernet_ref.checkpoints import (CheckpointError, convert_state_dict, detect_source,
                                     load_backbone_weights, load_weights, read_checkpoint_file,
                                     save_checkpoint)

from upernet_ref.training.runtime import non_finite_tensors

from helpers_checkpoints import to_mmseg
from shared_paths import SPEC


def spec_shapes(depth: int) -> dict[str, list[int]]:
    path = SPEC / f"sssegmentation_upernet_r{depth}_ade20k_state_dict.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


def synthetic_state_dict(shapes: dict[str, list[int]], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of the published shapes, each filled with a value unique to its key."""
    sd = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(i, dtype=torch.long, device=device)
        else:
            sd[key] = torch.full(shape, float(i), device=device)
    return sd


@pytest.mark.parametrize("depth", [50, 101])
def test_sssegmentation_layout_loads_strictly_on_meta(depth):
    shapes = spec_shapes(depth)
    sd = synthetic_state_dict(shapes, device="meta")
    assert detect_source(sd) == "sssegmentation"
    with torch.device("meta"):
        model = build_model(f"upernet_r{depth}_os8_ade20k")
    converted = convert_state_dict(sd, "sssegmentation")
    assert len(converted) == len(sd) == len(model.state_dict())
    model.load_state_dict(converted, strict=True, assign=True)


def test_sssegmentation_file_values_land_in_the_right_modules(tmp_path):
    shapes = spec_shapes(50)
    sd = synthetic_state_dict(shapes)
    path = tmp_path / "upernet_r50_ade20k.pth"
    # as released: a dict whose "model" entry is the state_dict, saved from DDP ("module.")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 130},
               path)
    model = build_model("upernet_r50_os16_ade20k")
    load_weights(model, path)
    pairs = {
        "backbone_net.stem.6.weight": model.backbone.stem[6].weight,
        "backbone_net.layer3.5.bn2.running_var": model.backbone.layer3[5].bn2.running_var,
        "ppm_net.branches.2.1.weight": model.decode_head.ppm.branches[2].conv.weight,
        "ppm_net.bottleneck.1.bias": model.decode_head.ppm.bottleneck.bn.bias,
        "lateral_convs.1.0.weight": model.decode_head.lateral_convs[1].conv.weight,
        "fpn_convs.2.1.weight": model.decode_head.fpn_convs[2].bn.weight,
        "decoder.0.weight": model.decode_head.fuse.conv.weight,
        "decoder.4.bias": model.decode_head.classifier.bias,
        "auxiliary_decoder.0.weight": model.aux_head.conv.conv.weight,
        "auxiliary_decoder.4.weight": model.aux_head.classifier.weight,
    }
    for key, param in pairs.items():
        torch.testing.assert_close(param.detach(), sd[key], msg=key)


def test_mmsegmentation_layout_loads_strictly(tmp_path):
    shapes = spec_shapes(50)
    sd = {to_mmseg(k): v for k, v in synthetic_state_dict(shapes, device="meta").items()}
    assert detect_source(sd) == "mmsegmentation"
    with torch.device("meta"):
        model = build_model("upernet_r50_os8_ade20k")
    model.load_state_dict(convert_state_dict(sd, "mmsegmentation"), strict=True, assign=True)
    # file round trip on the small model, with mmseg's "state_dict" + "meta" wrapper
    small = build_model("upernet_small_test")
    ours = small.state_dict()
    inverse = convert_state_dict({to_mmseg(k): to_mmseg(k) for k in shapes}, "mmsegmentation")  # ours -> mmseg
    assert len(inverse) == len(shapes)
    for key in ours:  # same structure names at any size
        assert key in inverse, key
    torch.save({"state_dict": {inverse[k]: v for k, v in ours.items()}, "meta": {}}, tmp_path / "m.pth")
    fresh = build_model("upernet_small_test")
    load_weights(fresh, tmp_path / "m.pth")
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ours[k])


@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_resnet_features_match_at_output_stride_32(depth):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    randomize_batchnorm(tv)  # non-trivial BN statistics, so a misplaced tensor would show
    model = build_model(get_config(f"upernet_r{depth}_os8_ade20k",
                                   {"model.stem": "plain", "model.output_stride": 32})).eval()
    converted = convert_state_dict(tv.state_dict(), "torchvision")
    assert all(k.startswith("backbone.") for k in converted) and "backbone.fc.weight" not in converted
    load_backbone_weights(model, tv.state_dict(), source="torchvision")
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        theirs = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            h = layer(h)
            theirs.append(h)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_torchvision_weights_fit_dilated_backbones_too():
    tv = torchvision.models.resnet50(weights=None)
    backbone = ResNet(50, 8, stem="plain")
    sd = {k[len("backbone."):]: v for k, v in convert_state_dict(tv.state_dict(), "torchvision").items()}
    backbone.load_state_dict(sd, strict=True)


def test_mismatch_message_lists_missing_unexpected_and_shapes(tmp_path):
    model = build_model("upernet_small_test")
    sd = model.state_dict()
    sd.pop("decode_head.classifier.bias")
    sd["decode_head.extra.weight"] = torch.zeros(1)
    sd["aux_head.classifier.weight"] = torch.zeros(3, 16, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model("upernet_small_test"), path)
    text = str(err.value)
    assert str(path) in text
    assert "missing keys (1)" in text and "decode_head.classifier.bias" in text
    assert "unexpected keys (1)" in text and "decode_head.extra.weight" in text
    assert "shape mismatches (1)" in text and "(3, 16, 1, 1) vs model (8, 16, 1, 1)" in text


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint_file(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_weights(build_model("upernet_small_test"), junk)


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint_file(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left over


def test_saved_checkpoints_get_the_usual_file_mode(tmp_path):
    """Like any file the user writes (0644 under umask 022), not mkstemp's private 0600."""
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"x": torch.zeros(1)}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_truncated_file_gets_a_short_message(tmp_path):
    good = save_checkpoint({"model": {"w": torch.zeros(1000)}}, tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint_file(bad)
    message = str(info.value)
    assert str(bad) in message and "not a readable checkpoint" in message
    assert "\n" not in message and len(message) < 300 + len(str(bad))


def test_a_full_disk_is_named_with_the_size_needed_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """The write goes to /dev/full (every write fails with ENOSPC), through torch's real zip
    writer, which on its own reports only "[enforce fail ...] unexpected pos"."""
    import upernet_ref.checkpoints as checkpoints
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)
    real_fdopen = os.fdopen

    def full_disk(fd, mode="r", *args, **kwargs):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints.os, "fdopen", full_disk)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"iteration": 2, "w": torch.zeros(1_000_000)}, path)
    message = str(info.value)
    assert message.startswith(f"{path}: no space left on the device") and "\n" not in message
    assert "about 4 MB needed" in message and "the previous last.pt is kept" in message
    monkeypatch.setattr(checkpoints.os, "fdopen", real_fdopen)
    assert read_checkpoint_file(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # its temporary removed


def test_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    import errno
    import tempfile

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError, match=r"last.pt: cannot write the checkpoint there "
                                              r"\(Permission denied\); give a writable --out"):
        save_checkpoint({"w": torch.ones(3)}, tmp_path / "last.pt")


def test_temporary_files_of_killed_saves_are_removed_not_those_of_live_ones(tmp_path):
    from upernet_ref.checkpoints import remove_stale_temporary_files
    dead_pid = 4_194_304 + 1  # above Linux's largest pid: no such process
    names = {"killed": f".last.pt.{dead_pid}.ab12cd34.tmp", "old_style": ".best.pt.x9y8z7w6.tmp",
             "live": f".last.pt.{os.getpid()}.zz99yy88.tmp", "other": ".notes.tmp", "ckpt": "last.pt"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporary_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["killed"], names["old_style"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["live"], names["other"], names["ckpt"]])
    assert remove_stale_temporary_files(tmp_path / "missing") == []


def test_checkpoints_with_nan_or_inf_tensors_are_refused_by_name(tmp_path):
    model = build_model("upernet_small_test")
    state = model.state_dict()
    state["decode_head.fuse.bn.running_var"] = torch.full_like(state["decode_head.fuse.bn.running_var"],
                                                              float("inf"))
    torch.save({"model": state}, tmp_path / "diverged.pt")
    with pytest.raises(CheckpointError, match=r"diverged.pt: 1 tensor\(s\) hold NaN or inf values "
                                              r"\(a diverged run\?\): decode_head.fuse.bn.running_var"):
        load_weights(build_model("upernet_small_test"), tmp_path / "diverged.pt")


def test_non_finite_tensors_finds_every_nan_and_infinity_in_any_float_dtype():
    """The min / max check (`runtime.non_finite_tensors`): a NaN first, last or alone, +-inf, in
    float64 / float32 / fp16 / bf16 (aminmax) and float8 (isfinite); empty tensors, integer
    tensors and non-tensors are never reported."""
    def at(i: int, value: float, dtype: torch.dtype = torch.float32, n: int = 257):
        t = torch.ones(n, dtype=torch.float32)
        t[i] = value
        return t.to(dtype)

    bad = {"nan_first": at(0, float("nan")), "nan_last": at(-1, float("nan")),
           "nan_alone": torch.tensor(float("nan")), "inf_f64": at(3, float("inf"), torch.float64),
           "minus_inf_fp16": at(7, -float("inf"), torch.float16),
           "nan_bf16": at(100, float("nan"), torch.bfloat16),
           "inf_float8": at(1, float("inf"), torch.float8_e5m2, n=4)}
    good = {"ones": torch.ones(2, 3), "empty": torch.zeros(0, 4), "ints": torch.arange(5),
            "large": torch.full((3,), 6e4, dtype=torch.float16), "step": 3,
            "bf16": torch.randn(10).bfloat16(), "float8": torch.ones(4).to(torch.float8_e5m2)}
    assert non_finite_tensors({**good, **bad}) == list(bad)
    assert non_finite_tensors(good) == []


def test_a_class_count_mismatch_is_one_line_naming_the_file(tmp_path):
    torch.save({"model": build_model("upernet_small_test").state_dict()}, tmp_path / "c8.pt")
    other = build_model(get_config("upernet_small_test", ["data.num_classes=3"]))
    with pytest.raises(CheckpointError) as info:
        load_weights(other, tmp_path / "c8.pt")
    assert str(info.value).startswith(f"{tmp_path / 'c8.pt'} was trained for 8 classes, the "
                                      "model has 3: give the configuration it was trained with")
    assert "\n" not in str(info.value)
