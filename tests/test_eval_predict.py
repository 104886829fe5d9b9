"""evaluate / predict: the mIoU of a whole split, and the `upernet eval` / `upernet predict` CLIs."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from upernet_ref import build_model, configs
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.cli.eval import protocol_tag
from upernet_ref.cli.eval import main as eval_main
from upernet_ref.cli.predict import main as predict_main

from helpers_checkpoints import to_sssegmentation

CFG = configs.get_config("upernet_small_test")


class ReadsItsAnswer(nn.Module):
    """A fake network whose prediction is written in the image's first channel."""

    num_classes = 4

    def forward(self, x):
        return F.one_hot(x[:, 0].round().long(), self.num_classes).permute(0, 3, 1, 2).float() * 5


def test_evaluate_gives_the_miou_computed_by_hand():
    pred_a, gt_a = [[0, 0, 1], [1, 2, 2]], [[0, 1, 1], [1, 2, 255]]
    pred_b, gt_b = [[0, 0], [0, 0]], [[0, 0], [255, 2]]
    dataset = [(torch.tensor(p, dtype=torch.float32).expand(3, -1, -1), torch.tensor(g))
               for p, g in ((pred_a, gt_a), (pred_b, gt_b))]
    # By hand, one confusion matrix over both images (rows = truth): [[3,0,0],[1,2,0],[1,0,1]]
    # IoU: class 0 3/(3+2) = 0.6, class 1 2/3, class 2 1/2, class 3 absent -> NaN, left out.
    cfg = configs.override(CFG, {"data.num_classes": 4})
    model = ReadsItsAnswer().train()
    result = evaluate(model, dataset, cfg, "cpu", progress=False, num_workers=0)
    assert result["miou"] == pytest.approx((0.6 + 2 / 3 + 0.5) / 3)
    assert result["macc"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert result["aacc"] == pytest.approx(6 / 8)
    assert math.isnan(result["iou"][3])
    assert result["num_images"] == 2 and result["pixels"] == 8
    assert "whole-image" in result["protocol"] and "single scale" in result["protocol"]
    assert model.training  # mode restored
    assert evaluate(model, dataset, cfg, progress=False, num_workers=0, limit=1)["aacc"] == pytest.approx(4 / 5)


def test_evaluate_resizes_predictions_to_the_label_size():
    # a 2x2 image whose prediction (class 1 on the left, 2 on the right) must be read at 4x6
    image = torch.tensor([[1.0, 2.0], [1.0, 2.0]]).expand(3, -1, -1)
    mask = torch.tensor([[1, 1, 1, 2, 2, 2]] * 4)
    cfg = configs.override(CFG, {"data.num_classes": 4})
    result = evaluate(ReadsItsAnswer(), [(image, mask)], cfg, "cpu", progress=False, num_workers=0)
    assert result["miou"] == pytest.approx(1.0)


def hand_dataset():
    gen = torch.Generator().manual_seed(0)
    items = []
    for h, w in ((5, 7), (6, 4), (3, 9)):
        pred = torch.randint(0, 4, (h, w), generator=gen)
        items.append((pred.float().expand(3, -1, -1), torch.randint(0, 4, (h, w), generator=gen)))
    return items


def _distributed_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = configs.override(CFG, {"data.num_classes": 4})
        result = evaluate(ReadsItsAnswer(), hand_dataset(), cfg, "cpu", progress=False,
                          num_workers=0)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result["iou"] + [result["pixels"]]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_shards_over_processes_and_sums_the_matrices(tmp_path):
    cfg = configs.override(CFG, {"data.num_classes": 4})
    single = evaluate(ReadsItsAnswer(), hand_dataset(), cfg, "cpu", progress=False, num_workers=0)
    torch.multiprocessing.spawn(_distributed_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    for rank in (0, 1):  # every rank ends with the metrics of the whole split
        values = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert values == pytest.approx(single["iou"] + [single["pixels"]])


# ----------------------------------------------------------------------------------------------
# Command line, on a checkpoint of the small test model (random weights)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(CFG)
    # Non-trivial BN statistics, so that a mis-loaded tensor would show. Not randomize_batchnorm:
    # its random affine maps leave this random-weight model's fast and eager argmax agreeing on
    # 97.7% of the pixels only (near-ties), under the 98% test_fast_flag_for_eval_... asks.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("ckpt")
    path = folder / "small.pth"
    torch.save({"model": model.state_dict(), "config": configs.to_dict(CFG), "iteration": 7}, path)
    return path, model


def run_eval(args, capsys):
    code = eval_main(args + ["--no-progress", "--num-workers", "0", "--device", "cpu"])
    return code, capsys.readouterr()


def test_eval_cli_on_the_demo_dataset(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    json_path = tmp_path / "res.json"
    code, out = run_eval(["--checkpoint", str(path), "--limit", "3", "--json", str(json_path)], capsys)
    assert code == 0, out.err
    result = json.loads(json_path.read_text())
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["aacc"] <= 1.0
    assert result["num_images"] == 3 and result["config"] == "upernet_small_test"
    assert "sky" in out.out and "mIoU" in out.out and "protocol: whole-image" in out.out
    # the CLI gives what the API gives
    from upernet_ref.data.transforms import test_transform
    from upernet_ref.sources import dataset_for
    dataset = dataset_for(CFG, "val", None, test_transform(CFG.data))
    direct = evaluate(model, dataset, CFG, "cpu", progress=False, num_workers=0, limit=3)
    assert result["miou"] == pytest.approx(direct["miou"], abs=1e-9)
    # default results file: next to the checkpoint
    code, out = run_eval(["--checkpoint", str(path), "--limit", "1", "--mode", "slide",
                          "--crop", "32x32", "--stride", "24", "--scales", "0.75,1", "--flip"],
                         capsys)
    assert code == 0, out.err
    saved = json.loads((path.parent / "small_eval_val_slide_crop32x32_stride24x24_s0.75-1_flip"
                        "_limit1.json").read_text())
    assert saved["mode"] == "slide" and saved["flip"] and saved["scales"] == [0.75, 1.0]
    assert saved["stride"] == [24, 24] and "sliding-window" in saved["protocol"]


def test_eval_takes_test_overrides_and_the_shorthands_are_the_same_overrides(checkpoint, tmp_path,
                                                                             capsys):
    path, _ = checkpoint
    ckpt = shutil.copy(path, tmp_path / "last.pt")
    by_key = ["--test.mode=slide", "--test.crop_size=32x32", "--test.stride=256x256",
              "--test.scales=0.75,1", "--test.flip=true"]
    by_shorthand = ["--mode", "slide", "--crop", "32", "--stride", "256x256", "--scales", "0.75,1",
                    "--flip"]
    results = []
    for i, protocol in enumerate((by_key, by_shorthand)):
        json_path = tmp_path / f"{i}.json"
        code, out = run_eval(["--checkpoint", str(ckpt), "--limit", "2", "--json", str(json_path)]
                             + protocol, capsys)
        assert code == 0, out.err
        results.append(json.loads(json_path.read_text()))
    for result in results:
        assert (result["mode"], result["crop_size"], result["stride"], result["scales"],
                result["flip"]) == ("slide", [32, 32], [256, 256], [0.75, 1.0], True)
        assert "stride 256x256" in result["protocol"]
    assert results[0]["miou"] == pytest.approx(results[1]["miou"], abs=1e-9)
    # a bad value is refused before any work, in one line naming the key
    code, out = run_eval(["--checkpoint", str(ckpt), "--test.stride=0x256"], capsys)
    assert code == 2 and "test.stride" in out.err and "Traceback" not in out.err
    code, out = run_eval(["--checkpoint", str(ckpt), "--test.mode=tiles"], capsys)
    assert code == 2 and "test.mode must be 'whole' or 'slide'" in out.err
    # a shorthand and its own key together are ambiguous
    code, out = run_eval(["--checkpoint", str(ckpt), "--stride", "24", "--test.stride=32x32"], capsys)
    assert code == 2 and "--stride and --test.stride both given" in out.err
    assert not list(tmp_path.glob("last_eval_*.json"))  # nothing was computed for the refusals


def _eval_cli_worker(rank, world, port, checkpoint_path, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = eval_main(["--checkpoint", str(checkpoint_path), "--limit", "5", "--no-progress",
                      "--num-workers", "0", "--device", "cpu",
                      "--json", str(out_dir / f"rank{rank}.json")])
    assert code == 0
    assert not dist.is_initialized(), "upernet eval must leave the process group"


@pytest.mark.slow
def test_eval_cli_under_torchrun_shards_the_split(checkpoint, tmp_path, capsys, monkeypatch):
    """`torchrun ... upernet eval`: each rank takes every world-th image, rank 0 reports."""
    import socket
    path, _ = checkpoint
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_eval_cli_worker, args=(2, port, path, tmp_path), nprocs=2)
    assert not (tmp_path / "rank1.json").exists()  # only rank 0 writes
    both = json.loads((tmp_path / "rank0.json").read_text())
    code, out = run_eval(["--checkpoint", str(path), "--limit", "5",
                          "--json", str(tmp_path / "one.json")], capsys)
    assert code == 0, out.err
    one = json.loads((tmp_path / "one.json").read_text())
    assert both["num_images"] == one["num_images"] == 5
    assert both["iou"] == pytest.approx(one["iou"], nan_ok=True)
    assert both["miou"] == pytest.approx(one["miou"])


def test_protocol_tag_names_every_choice():
    test = configs.TestConfig
    assert protocol_tag(test()) == "whole"
    assert protocol_tag(test(mode="slide", scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True,
                             crop_size=(512, 512)),
                        fast=True, limit=100) \
        == "slide_crop512x512_stride341x341_s0.5-0.75-1-1.25-1.5-1.75_flip_fast_limit100"
    assert protocol_tag(test(scales=(0.75,))) == "whole_s0.75"
    window = (512, 512)
    assert protocol_tag(test(mode="slide", crop_size=window, stride=(256, 256))) \
        != protocol_tag(test(mode="slide", crop_size=window))


def test_eval_default_results_files_differ_by_protocol(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    ckpt = shutil.copy(path, tmp_path / "last.pt")  # a folder of its own: only our results in it
    for protocol in ([], ["--mode", "slide", "--crop", "32x32", "--stride", "24", "--flip"]):
        code, out = run_eval(["--checkpoint", str(ckpt), "--limit", "1"] + protocol, capsys)
        assert code == 0, out.err
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == ["last_eval_val_slide_crop32x32_stride24x24_flip_limit1.json",
                       "last_eval_val_whole_limit1.json"]
    whole, slide = (json.loads((tmp_path / name).read_text()) for name in reversed(written))
    assert whole["mode"] == "whole" and not whole["flip"]
    assert slide["mode"] == "slide" and slide["flip"]


def test_evaluate_takes_items_in_the_test_pipelines_form_and_refuses_raw_ones(checkpoint):
    from upernet_ref.demo_scenes import DemoScenes
    from upernet_ref.data.transforms import test_transform
    _, model = checkpoint
    was_training = model.training
    ready = evaluate(model, DemoScenes("val", transform=test_transform(CFG.data)), CFG, "cpu",
                     progress=False, num_workers=0, limit=2)
    assert ready["pixels"] > 0 and ready["num_images"] == 2
    with pytest.raises(ValueError, match=r"transform=test_transform\(cfg.data\)"):
        evaluate(model, DemoScenes("val"), CFG, "cpu", progress=False, num_workers=0, limit=2)
    assert model.training == was_training  # restored after the refusal too


def test_eval_loads_a_published_sssegmentation_file(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    sss = tmp_path / "upernet_sss.pth"
    torch.save({"model": to_sssegmentation(model.state_dict()), "optimizer": {}, "epoch": 130}, sss)
    ours = tmp_path / "ours.json"
    theirs = tmp_path / "theirs.json"
    assert run_eval(["--checkpoint", str(path), "--limit", "2", "--json", str(ours)], capsys)[0] == 0
    # no config stored in a published file: --config is required
    code, out = run_eval(["--checkpoint", str(sss), "--limit", "2"], capsys)
    assert code == 2 and "--config" in out.err
    code, out = run_eval(["--checkpoint", str(sss), "--config", "upernet_small_test", "--limit", "2",
                          "--json", str(theirs)], capsys)
    assert code == 0, out.err
    assert json.loads(theirs.read_text())["iou"] == json.loads(ours.read_text())["iou"]


def test_eval_reports_a_missing_checkpoint(tmp_path, capsys):
    code, out = run_eval(["--checkpoint", str(tmp_path / "nope.pth")], capsys)
    assert code == 2 and "nope.pth" in out.err


def test_predict_cli_writes_maps_and_names_unreadable_files(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(images / "b.jpg")
    (images / "broken.jpg").write_bytes(b"not an image at all")
    out_dir = tmp_path / "out"
    code = predict_main(["--checkpoint", str(path), "--out", str(out_dir), "--device", "cpu",
                         "--scales", "0.75,1.0", "--flip", str(images)])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in captured.err
    for stem, size in (("a", (56, 40)), ("b", (20, 30))):
        index = Image.open(out_dir / f"{stem}.png")
        color = Image.open(out_dir / f"{stem}_color.png")
        assert index.mode == "L" and index.size == size
        assert color.mode == "P" and color.size == size
        assert np.array_equal(np.asarray(index), np.asarray(color))  # same indices
        assert np.asarray(index).max() < CFG.data.num_classes
        assert Image.open(out_dir / f"{stem}_overlay.jpg").size == size
    assert not (out_dir / "broken.png").exists()
    # every readable image: exit status 0
    assert predict_main(["--checkpoint", str(path), "--out", str(out_dir), "--device", "cpu",
                         str(images / "a.png")]) == 0


def test_fast_flag_for_eval_and_predict_agrees_with_eager(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    results = {}
    for fast in (False, True):
        json_path = tmp_path / f"fast_{fast}.json"
        code, out = run_eval(["--checkpoint", str(path), "--limit", "4", "--json", str(json_path)]
                             + (["--fast"] if fast else []), capsys)
        assert code == 0, out.err
        results[fast] = json.loads(json_path.read_text())
    assert results[True]["fast"] and not results[False]["fast"]
    assert "(fast path)" in out.out
    assert abs(results[True]["miou"] - results[False]["miou"]) <= 0.01  # random weights: near-ties
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        images / "a.png")
    maps = {}
    for fast in (False, True):
        out_dir = tmp_path / f"pred_{fast}"
        assert predict_main(["--checkpoint", str(path), "--out", str(out_dir), "--device", "cpu",
                             str(images / "a.png")] + (["--fast"] if fast else [])) == 0
        maps[fast] = np.asarray(Image.open(out_dir / "a.png"))
    assert (maps[True] == maps[False]).mean() >= 0.98


from shared_paths import REALDATA as _REALDATA
REALDATA = str(_REALDATA / "voc")


def test_eval_on_real_voc_samples(tmp_path, capsys):
    import os
    if not os.path.isdir(REALDATA):
        pytest.skip("real VOC samples not available")
    cfg = configs.override(CFG, {"data.dataset": "voc", "data.num_classes": 21})
    torch.manual_seed(0)
    path = tmp_path / "voc_small.pth"
    torch.save({"model": build_model(cfg).state_dict(), "config": configs.to_dict(cfg)}, path)
    json_path = tmp_path / "voc.json"
    code, out = run_eval(["--checkpoint", str(path), "--data-root", REALDATA, "--split", "val",
                          "--limit", "2", "--json", str(json_path)], capsys)
    assert code == 0, out.err
    result = json.loads(json_path.read_text())
    assert result["num_images"] == 2 and len(result["iou"]) == 21
    assert "aeroplane" in out.out or "background" in out.out
    # compared at the original label size, without the 255 boundary pixels
    from upernet_ref.data.datasets import build_dataset
    masks = [build_dataset(cfg, "val", REALDATA)[i][1] for i in range(2)]
    assert result["pixels"] == sum(int((m != 255).sum()) for m in masks)
    assert any((m == 255).any() for m in masks)


def test_eval_limit_is_stated_and_must_be_positive(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    code, out = run_eval(["--checkpoint", str(path), "--limit", "2",
                          "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, out.err
    assert "the first 2 of" in out.out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert "over the first 2 of" in saved["protocol"]
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", str(path), "--limit", "0"])
    assert "positive integer" in capsys.readouterr().err
