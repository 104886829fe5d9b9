"""Bad input through the real command line: one line `upernet CMD: error: ...` naming the file
and the problem, the README's exit code, never a traceback (README, "Errors and exit codes").

Every case runs `upernet_ref.cli.main` (what the `upernet` script calls) in this process, with
the file descriptors captured, so DataLoader workers' output is seen too.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from upernet_ref.configs import get_config, to_dict
from upernet_ref.model import build_model

from helpers_cli import one_line, run
from helpers_data import make_fake_folder, save_index_png

FOLDER3 = ["data.dataset=folder", "data.num_classes=3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-class folder dataset, a checkpoint trained for it (config inside), bad files."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    root = make_fake_folder(tmp / "good", n=3)
    cfg = get_config("upernet_small_test", FOLDER3)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    torch.save({"model": state, "config": to_dict(cfg)}, tmp / "ckpt3.pt")
    diverged = dict(state, **{"decode_head.fuse.bn.running_var":
                              torch.full_like(state["decode_head.fuse.bn.running_var"], float("inf"))})
    torch.save({"model": diverged, "config": to_dict(cfg)}, tmp / "diverged.pt")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp / "a_file").write_text("x")
    (tmp / "empty_folder").mkdir()
    return tmp, root


def broken(files, split: str, how: str):
    """A copy of the good dataset with one bad sample in `split`."""
    tmp, root = files
    copy = tmp / f"{how}_{split}"
    if not copy.exists():
        shutil.copytree(root, copy)
        masks, images = copy / "masks" / split, copy / "images" / split
        if how == "missing_label":
            (masks / "img1.png").unlink()
        elif how == "size":
            save_index_png(np.zeros((10, 10)), masks / "img1.png")
        elif how == "values":
            save_index_png(np.full((24, 32), 9), masks / "img1.png")
        elif how == "not_an_image":
            (images / "img1.jpg").write_bytes(b"\xff\xd8\xff garbage")
        elif how == "empty":
            for p in images.iterdir():
                p.unlink()
    return copy


EVAL_CASES = {  # how the val split is broken -> what the message says
    "missing_label": "img1.png: label file is missing",
    "size": "img1.png: label size (10, 10) differs from image",
    "values": "img1.png: label values 9 are outside the valid set",
    "not_an_image": "img1.jpg: unreadable or truncated image",
}


@pytest.fixture(autouse=True)
def quick_worker_shutdown(monkeypatch):
    """A loader whose iteration raised is freed by the garbage collector (the exception's
    traceback holds it in a cycle), which closes its index queues before the loader's own
    shutdown sends the workers their stop signal: each worker then exits only when its poll of
    MP_STATUS_CHECK_INTERVAL (5 s) times out, 10 s per failed loader in this process. Polling
    every 0.1 s gives the same results in a fraction of the time."""
    from torch.utils.data import _utils
    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.1)  # the loader's join
    monkeypatch.setattr(_utils.worker, "MP_STATUS_CHECK_INTERVAL", 0.1)  # the forked workers


# every failure kind without workers; with workers one is enough
@pytest.mark.parametrize("how, workers", [(how, 0) for how in EVAL_CASES] + [("values", 2)])
def test_eval_with_a_bad_sample(files, capfd, how, workers):
    tmp, _ = files
    code, _, err = run(capfd, ["eval", "--checkpoint", str(tmp / "ckpt3.pt"), "--no-progress",
                               "--data-root", str(broken(files, "val", how)),
                               "--num-workers", str(workers), "--json", str(tmp / "r.json")])
    assert code == 1
    one_line(err, "eval", EVAL_CASES[how])


def test_eval_skips_and_counts_bad_samples_with_workers(files, capfd):
    import json
    tmp, _ = files
    code, out, _ = run(capfd, ["eval", "--checkpoint", str(tmp / "ckpt3.pt"), "--no-progress",
                               "--data-root", str(broken(files, "val", "values")),
                               "--data.on_bad=skip", "--num-workers", "2",
                               "--json", str(tmp / "skip.json")])
    assert code == 0 and "skipped 1 bad sample(s) (data.on_bad=skip)" in out
    saved = json.loads((tmp / "skip.json").read_text())
    assert saved["skipped"] == 1 and saved["num_images"] == 2
    assert "label values 9" in next(iter(saved["skipped_samples"].values()))


def test_eval_refuses_bad_checkpoints_and_outputs_before_any_work(files, capfd):
    tmp, root = files
    base = ["eval", "--data-root", str(root), "--no-progress"]
    cases = [
        (["--checkpoint", str(tmp / "ckpt3.pt"), "--config", "upernet_small_test"],
         f"{tmp / 'ckpt3.pt'} was trained for 3 classes, the model has 8"),
        (["--checkpoint", str(tmp / "diverged.pt")], "diverged.pt: 1 tensor(s) hold NaN or inf"),
        (["--checkpoint", str(tmp / "garbage.pt")], "garbage.pt: not a readable checkpoint"),
        (["--checkpoint", str(tmp / "missing.pt")], "missing.pt: no such checkpoint file"),
        (["--checkpoint", str(tmp / "ckpt3.pt"), "--json", str(tmp / "a_file" / "r.json")],
         "--json", "a_file"),
    ]
    for extra, *fragments in cases:
        code, out, err = run(capfd, base + extra)
        assert code == 2, err
        one_line(err, "eval", *fragments)
        assert "evaluating" not in out  # refused before any work


def test_train_problems_found_before_any_work_exit_2(files, capfd):
    tmp, root = files
    base = ["train", "--config", "upernet_small_test", "--no-progress", "--no-val",
            "--max-iters", "1", "--out", str(tmp / "run")] + [f"--{o}" for o in FOLDER3]
    cases = [
        ([], "needs its folder: --data-root DIR"),
        (["--data-root", str(broken(files, "train", "empty"))], "empty split"),
        (["--data-root", str(root), "--weights", str(tmp / "garbage.pt")], "garbage.pt"),
        (["--data-root", str(root), "--weights", str(tmp / "diverged.pt")], "NaN or inf"),
        (["--data-root", str(root), "--data.num_classes=5"],
         "classes.txt names 3 classes, but data.num_classes=5"),
        (["--data-root", str(root), "--weights", str(tmp / "ckpt3.pt"),
          "--config", "upernet_small_demo"], "was trained as upernet_small_test, the model asked "
                                             "for is upernet_small_demo"),
        (["--data-root", str(root), "--out", str(tmp / "a_file" / "run")], "--out", "a_file"),
        (["--data-root", str(root), "--data.on_bad=sometimes"], "data.on_bad must be"),
    ]
    for extra, *fragments in cases:
        code, _, err = run(capfd, base + extra)
        assert code == 2, err
        if "upernet_small_demo" in extra:  # another configuration: 2 lines that say so
            assert err.count("\n") == 2 and fragments[0] in err, err
            continue
        one_line(err, "train", *fragments)


def test_train_with_a_bad_sample_and_workers(files, capfd):
    tmp, _ = files
    data = str(broken(files, "train", "values"))
    base = ["train", "--config", "upernet_small_test", "--no-progress", "--no-val",
            "--max-iters", "1", "--data-root", data, "--data.num_workers=2"] + [f"--{o}" for o in FOLDER3]
    code, _, err = run(capfd, base + ["--out", str(tmp / "bad_run")])
    assert code == 1
    one_line(err, "train", "img1.png: label values 9 are outside the valid set")
    code, out, _ = run(capfd, base + ["--out", str(tmp / "skip_run"), "--data.on_bad=skip"])
    assert code == 0 and "skipped 1 bad training sample(s) (data.on_bad=skip)" in out


def test_predict_export_bench_memory_refuse_bad_input(files, capfd):
    tmp, root = files
    image = str(root / "images" / "val" / "img0.jpg")
    unwritable = str(tmp / "a_file" / "out")
    cases = [
        ("predict", ["--checkpoint", str(tmp / "ckpt3.pt"), "--out", unwritable, image], 2, "--out"),
        ("predict", ["--checkpoint", str(tmp / "ckpt3.pt"), "--config", "upernet_small_test",
                     "--out", str(tmp / "p"), image], 2, "was trained for 3 classes"),
        ("predict", ["--checkpoint", str(tmp / "diverged.pt"), "--out", str(tmp / "p"), image], 2,
         "NaN or inf"),
        ("predict", ["--checkpoint", str(tmp / "ckpt3.pt"), "--out", str(tmp / "p"),
                     str(tmp / "nothing_here")], 2, "no such file or folder: "),
        ("predict", ["--checkpoint", str(tmp / "ckpt3.pt"), "--out", str(tmp / "p"),
                     str(tmp / "empty_folder")], 2, "no images"),
        ("export", ["--checkpoint", str(tmp / "ckpt3.pt"), "--out", unwritable + ".onnx"], 2, "--out"),
        ("export", ["--checkpoint", str(tmp / "diverged.pt"), "--out", str(tmp / "m.onnx")], 2,
         "NaN or inf"),
        ("memory", ["--config", "upernet_small_test", "--json", unwritable + ".json"], 2, "--json"),
        ("bench", ["--config", "upernet_small_test", "--json", unwritable + ".json"], 2, "--json"),
        ("bench", ["--config", "no_such_config"], 2, "unknown configuration"),
    ]
    if not torch.cuda.is_available():
        cases.append(("bench", ["--config", "upernet_small_test", "--device", "cuda"], 2,
                      "CUDA is not available"))
    for command, argv, expected, fragment in cases:
        code, _, err = run(capfd, [command] + argv)
        assert code == expected, (command, argv, err)
        one_line(err, command, fragment)


def test_predict_reports_an_unreadable_image_and_predicts_the_others(files, capfd):
    tmp, root = files
    bad = broken(files, "val", "not_an_image") / "images" / "val"
    code, out, err = run(capfd, ["predict", "--checkpoint", str(tmp / "ckpt3.pt"), "--out",
                                 str(tmp / "preds"), str(bad)])
    assert code == 1 and "2 of 3 images predicted" in out
    assert f"upernet predict: error: {bad / 'img1.jpg'}: unreadable or truncated image" in err
