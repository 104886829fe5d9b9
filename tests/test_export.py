"""ONNX export (dynamic batch / height / width, checked with onnxruntime at two sizes, with
metadata) and torch.export (static shape)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from upernet_ref import build_model
from upernet_ref.perf.export import (adaptive_pool_matrix, check_size, export_onnx, export_torch,
                                     exportable_model)
from upernet_ref.cli.export import main


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("upernet_small_test").eval()


@pytest.mark.parametrize("in_size,out_size", [(8, 3), (12, 6), (5, 6), (7, 1), (6, 2)])
def test_pool_matrix_equals_adaptive_avg_pool(in_size, out_size):
    x = torch.randn(2, 3, in_size, in_size + 1, dtype=torch.float64)
    ph = adaptive_pool_matrix(in_size, out_size).double()
    pw = adaptive_pool_matrix(in_size + 1, out_size).double()
    pooled = torch.einsum("ih,bchw,jw->bcij", ph, x, pw)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, out_size))


def test_traced_ppm_model_equals_eager(model):
    # 64x96 at output stride 8 -> an 8x12 C5 map: 3 and 6 do not divide 8, the case ONNX's
    # AveragePool cannot express; the same module serves every size.
    wrapped = exportable_model(model)
    for size in ((64, 96), (41, 57)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), model(x)["out"], atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_pytorch(model, tmp_path):
    report = export_onnx(model, (64, 96), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 10_000
    assert report["onnx_vs_eager_max_abs_diff"] < 1e-4
    assert report["onnx_vs_eager_argmax_agreement"] >= 0.999
    assert report["onnx_vs_eager_49x121_max_abs_diff"] < 1e-4  # the second size, batch 2


def test_onnx_model_runs_on_other_data(model, tmp_path):
    import onnxruntime as ort

    export_onnx(model, (64, 96), tmp_path / "m.onnx", check=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 64, 96), (3, 3, 37, 50), (1, 3, 128, 72)):  # any batch and size
        x = torch.rand(*shape) * 4 - 2
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)["out"].numpy()
        assert logits.shape == (shape[0], 8, *shape[2:])
        assert np.abs(logits - expected).max() < 1e-4


def test_torch_export_runs(model, tmp_path):
    report = export_torch(model, (64, 64), tmp_path / "m.pt2")
    assert report["export_vs_eager_max_abs_diff"] < 1e-5


def test_command_line(tmp_path, capsys):
    import json
    import onnx
    assert main(["--config", "upernet_small_test", "--size", "48x64", "--format", "onnx",
                 "--out", str(tmp_path / "cli.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnx_vs_eager_argmax_agreement: 1" in out
    assert "onnx_vs_eager_37x81_argmax_agreement: 1" in out  # checked at a second size
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "cli.onnx")).metadata_props}
    assert json.loads(props["classes"])[:3] == ["sky", "ground", "disc"]
    assert json.loads(props["mean"]) == [123.675, 116.28, 103.53] and "std" in props
    dims = onnx.load(str(tmp_path / "cli.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


def test_bad_size_is_a_clear_error(model):
    with pytest.raises(ValueError, match="size"):
        check_size(model, (0, 64))
    with pytest.raises(SystemExit):
        main(["--config", "upernet_small_test", "--size", "64xa", "--out", "x.onnx"])


def test_bad_config_or_checkpoint_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["--config", "nope", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x.onnx")]) == 2  # neither config nor checkpoint
    assert "--config NAME" in capsys.readouterr().err
    missing = tmp_path / "missing.pt"
    assert main(["--config", "upernet_small_test", "--checkpoint", str(missing),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert str(missing) in capsys.readouterr().err
    other = build_model("upernet_small_demo")  # wider model: every shape mismatches
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    assert main(["--config", "upernet_small_test", "--checkpoint", str(tmp_path / "other.pt"),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_the_checkpoint_s_own_configuration_is_used(tmp_path, capsys):
    from upernet_ref.configs import get_config, to_dict
    net = build_model("upernet_small_test")
    path = tmp_path / "ours.pt"
    torch.save({"model": net.state_dict(), "config": to_dict(get_config("upernet_small_test"))},
               path)
    assert main(["--checkpoint", str(path), "--size", "32x32", "--format", "torch-export",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    captured = capsys.readouterr()
    assert "exported upernet_small_test" in captured.out
    assert "writes .pt2 files" in captured.err  # a name that does not match the format: noted
