"""The trainer: exact resume, atomic checkpoints, non-finite loss, signals, command line.

All runs use `upernet_small_test` (a 32x32 crop, global batch 4) on a tiny in-memory dataset
whose items draw random augmentations (a flip from torch, noise from numpy): the resume test
then also checks that the data order and the augmentations continue exactly.
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from upernet_ref import collectives

from upernet_ref.perf import batch_probe
from upernet_ref import runs
from upernet_ref.training import runtime
from upernet_ref.cli import train as train_cli
from upernet_ref.cli.train import run_training
from upernet_ref.training import trainer as trainer_mod
from upernet_ref.checkpoints import CheckpointError, read_checkpoint_file
from upernet_ref.configs import get_config, override
from upernet_ref.training.data_order import batch_decomposition
from upernet_ref.runs import read_log
from upernet_ref.model import build_model
from upernet_ref.training.schedule import poly_lr
from upernet_ref.training.trainer import NonFiniteLossError


class TinyScenes(torch.utils.data.Dataset):
    """Learnable toy data: class = quadrant colour; random flip and noise; a 255 border."""

    def __init__(self, n: int = 12, size: int = 32, num_classes: int = 8, on_get=None):
        self.n, self.size, self.k, self.on_get = n, size, num_classes, on_get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.on_get is not None:
            self.on_get(i)
        g = torch.Generator().manual_seed(i)
        mask = torch.randint(0, self.k, (self.size // 8, self.size // 8), generator=g)
        mask = mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
        image = torch.stack([mask.float() / self.k, 1 - mask.float() / self.k, mask.float() % 2])
        image = image + torch.from_numpy(np.random.normal(0, 0.1, image.shape)).float()
        if torch.rand(()) < 0.5:  # random horizontal flip (seeded per item by the trainer)
            image, mask = image.flip(-1), mask.flip(-1)
        mask = mask.clone()
        mask[:1] = 255
        return image, mask


def small_cfg(**changes):
    base = {"train.log_interval": 1, "train.checkpoint_interval": 100, "train.val_interval": 0}
    return override(get_config("upernet_small_test"), {**base, **changes})


def run(cfg, out, **kw):
    kw.setdefault("train_dataset", TinyScenes())
    return run_training(cfg, out_dir=out, validate=False, progress=False, tensorboard=False,
                 log=lambda *_: None, **kw)


def params(path):
    return read_checkpoint_file(path)["model"]


def test_resume_continues_exactly(tmp_path):
    cfg = small_cfg()
    full = run(cfg, tmp_path / "full", max_iters=6)
    first = run(cfg, tmp_path / "split", max_iters=6, stop_at=4)
    assert first.iteration == 4 and len(first.losses) == 4
    ckpt = read_checkpoint_file(tmp_path / "split" / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["epoch"] == 1 and ckpt["position"] == 4  # 16 of 12 seen
    second = run(cfg, tmp_path / "split", max_iters=6, resume=True)
    assert second.iteration == 6 and len(second.losses) == 2
    torch.testing.assert_close(torch.tensor(first.losses + second.losses),
                               torch.tensor(full.losses), rtol=0, atol=1e-6)
    a, b = params(tmp_path / "full" / "last.pt"), params(tmp_path / "split" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the resumed run's log reads like one run
    assert [r["iter"] for r in read_log(tmp_path / "split" / "log.jsonl")] == list(range(1, 7))
    assert (tmp_path / "split" / "curves.png").stat().st_size > 0
    # the loss fell: the run did learn something
    assert np.mean(full.losses[-3:]) < np.mean(full.losses[:3])


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg()
    run(cfg, tmp_path, max_iters=3, stop_at=2)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):  # writes half a file, then the disk "fails"
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="last.pt: the checkpoint could not be saved "
                                              r"\(No space left on device\); the previous"):
        run(cfg, tmp_path, max_iters=3, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = read_checkpoint_file(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], "temporary file left behind"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(**{"train.checkpoint_interval": 2})
    real_loss = trainer_mod.segmentation_loss
    calls = {"n": 0}

    def loss_with_nan(outputs, target, train_cfg, ignore_index=255):
        calls["n"] += 1
        total, parts = real_loss(outputs, target, train_cfg, ignore_index)
        if calls["n"] == 4:  # iteration 4 (one micro-step per iteration)
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(trainer_mod, "segmentation_loss", loss_with_nan)
    with pytest.raises(NonFiniteLossError, match="iteration 4"):
        run(cfg, tmp_path, max_iters=10)
    ckpt = read_checkpoint_file(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["iter"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_non_finite_batchnorm_statistics_stop_the_run_before_they_are_saved(tmp_path, monkeypatch):
    """A diverging run can keep a finite loss while BN's running_var overflows (the loss uses
    the batch's statistics): the run stops like a non-finite loss, last.pt stays good."""
    cfg = small_cfg(**{"train.checkpoint_interval": 2})
    built, real_loss, calls = [], trainer_mod.segmentation_loss, {"n": 0}
    monkeypatch.setattr(train_cli, "build_model", lambda c: built.append(build_model(c)) or built[-1])

    def loss_then_overflow(outputs, target, train_cfg, ignore_index=255):
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 4: the loss is finite, a BN buffer is not
            bn = built[0].decode_head.fuse.bn  # a new tensor: the old one is saved for backward
            bn.running_var = torch.full_like(bn.running_var, float("inf"))
        return real_loss(outputs, target, train_cfg, ignore_index)

    monkeypatch.setattr(trainer_mod, "segmentation_loss", loss_then_overflow)
    with pytest.raises(NonFiniteLossError, match=r"after iteration 4 \(1 tensor\(s\): "
                                                 r"decode_head.fuse.bn.running_var\)") as info:
        run(cfg, tmp_path, max_iters=10)
    assert info.value.exit_code == 3 and f"the last good checkpoint is {tmp_path / 'last.pt'}" in str(info.value)
    ckpt = read_checkpoint_file(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2  # the iteration-4 checkpoint was never written
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_bad_samples_are_skipped_and_counted_across_dataloader_workers(tmp_path):
    from helpers_data import make_fake_folder, save_index_png
    root = make_fake_folder(tmp_path, n=3)
    save_index_png(np.full((24, 32), 9), root / "masks" / "train" / "img1.png")  # 3 classes
    (tmp_path / "run").mkdir()
    stale = tmp_path / "run" / ".last.pt.4194305.ab12cd34.tmp"  # a save killed midway
    stale.write_bytes(b"PK half a checkpoint")
    cfg = small_cfg(**{"data.dataset": "folder", "data.num_classes": 3, "data.on_bad": "skip",
                       "data.num_workers": 2})
    result = run_training(cfg, data_root=str(root), out_dir=tmp_path / "run", max_iters=2,
                   validate=False, progress=False, tensorboard=False, log=lambda *_: None)
    assert result.iteration == 2 and not stale.exists()
    assert list(result.skipped) == [f"image {root}/images/train/img1.jpg, label "
                                    f"{root}/masks/train/img1.png"]
    assert "label values 9 are outside the valid set" in next(iter(result.skipped.values()))
    record = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "data"]
    assert record[0]["skipped"] == 1 and record[0]["skipped_samples"] == result.skipped
    with pytest.raises(ValueError, match="data.on_bad must be 'raise' or 'skip', got 'ignore'"):
        run_training(override(cfg, ["data.on_bad=ignore"]), data_root=str(root), out_dir=tmp_path / "r2",
              max_iters=1, progress=False, log=lambda *_: None)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    fetched = {"n": 0}

    def send_sigterm(i):
        fetched["n"] += 1
        if fetched["n"] == 5:  # during iteration 2 (4 items per iteration)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = run(small_cfg(), tmp_path, max_iters=10,
                 train_dataset=TinyScenes(on_get=send_sigterm))
    assert result.interrupted == "SIGTERM"
    assert result.iteration == 2
    assert read_checkpoint_file(tmp_path / "last.pt")["iteration"] == 2
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored


def test_the_final_checkpoint_is_written_before_the_final_validation(tmp_path):
    """A kill or crash while validating at the end must not lose the run's last iterations."""
    last = tmp_path / "last.pt"
    seen = []  # last.pt's iteration when each validation starts (None: no file yet)

    def at_validation(i):
        if i == 0:
            seen.append(read_checkpoint_file(last)["iteration"] if last.exists() else None)

    cfg = small_cfg(**{"train.val_interval": 2})  # checkpoint_interval stays 100
    result = run_training(cfg, out_dir=tmp_path, max_iters=3, progress=False, tensorboard=False,
                   log=lambda *_: None, train_dataset=TinyScenes(),
                   val_dataset=TinyScenes(n=2, on_get=at_validation))
    # set-up looks at item 0 once (a raw val set is refused before training); then iteration 2:
    # periodic, no checkpoint due; iteration 3: saved first
    assert seen == [None, None, 3]
    assert [r["iter"] for r in result.val] == [2, 3]
    ckpt = read_checkpoint_file(last)
    assert ckpt["iteration"] == 3
    best = max(result.val, key=lambda r: r["miou"])
    assert ckpt["best_miou"] == pytest.approx(best["miou"])  # re-saved after a final best
    assert read_checkpoint_file(tmp_path / "best.pt")["iteration"] == best["iter"]


def test_a_raw_val_set_is_refused_before_training(tmp_path):
    """evaluate takes val items in the test pipeline's form: a uint8 one is refused at set-up,
    not after hours of training at the first validation."""
    from upernet_ref.demo_scenes import DemoScenes
    from upernet_ref.errors import found_before_work
    with pytest.raises(ValueError, match=r"transform=test_transform\(cfg.data\)") as raised:
        run_training(small_cfg(), out_dir=tmp_path, max_iters=3, progress=False, tensorboard=False,
              log=lambda *_: None, train_dataset=TinyScenes(), val_dataset=DemoScenes("val"))
    assert found_before_work(raised.value)  # `upernet train` exits 2: the user's input
    assert not (tmp_path / "last.pt").exists()


def test_restore_deterministic_puts_every_global_flag_back():
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    flags = runtime.set_deterministic(True, torch.device("cuda"))  # sets flags only, no GPU needed
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert cudnn.deterministic and not cudnn.benchmark
    finally:
        runtime.restore_deterministic(flags)
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
            cudnn.benchmark) == before


def test_out_of_memory_is_recognised_in_all_its_forms():
    assert batch_probe.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried"))
    assert batch_probe.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert batch_probe.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not batch_probe.is_out_of_memory(RuntimeError("Expected more than 1 value per channel"))
    assert not batch_probe.is_out_of_memory(ValueError("out of memory"))


def test_largest_fitting_batch():
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= 3

    assert batch_probe.largest_fitting_batch([8, 4, 2, 1], fits) == 2
    assert tried == [8, 4, 2]  # stops at the first that fits
    assert batch_probe.largest_fitting_batch([8, 4], fits) is None


def test_batch_decomposition_and_accumulation(tmp_path):
    cfg = small_cfg(**{"model.dropout": 0.0})
    one = run(cfg, tmp_path / "a", max_iters=2, per_device_batch=4)
    acc = run(cfg, tmp_path / "b", max_iters=2, per_device_batch=2)
    assert (one.per_device_batch, one.accumulation) == (4, 1)
    assert (acc.per_device_batch, acc.accumulation) == (2, 2)
    # BN sees 2 images instead of 4, so the numbers differ a little, but the first loss
    # (before any update) is the mean of the two halves' losses, up to the ignored-pixel mix
    assert abs(one.losses[0] - acc.losses[0]) < 0.05
    # each micro-batch loss is scaled by 1 / accumulation steps: the summed gradients are the
    # mean over the global batch, so the updates have the size of the 4-image ones (without
    # the scaling they would be about twice as large)
    runtime.seed_everything(cfg.train.seed)  # the trainer's initial weights
    init = build_model(cfg).state_dict()
    names = [n for n, _ in build_model(cfg).named_parameters()]

    def update_norm(path):
        final = params(path)
        return torch.cat([(final[n] - init[n]).flatten() for n in names]).norm().item()

    ratio = update_norm(tmp_path / "b" / "last.pt") / update_norm(tmp_path / "a" / "last.pt")
    assert 0.75 < ratio < 1.33, ratio
    # one scheduler step per optimizer step, not per micro-batch
    for out in ("a", "b"):
        lrs = [r["lr"] for r in read_log(tmp_path / out / "log.jsonl")]
        assert lrs == pytest.approx([poly_lr(i, 2, cfg.train.lr, cfg.train.min_lr) for i in (0, 1)])
    with pytest.raises(ValueError, match="does not divide"):
        run(cfg, tmp_path / "c", max_iters=1, per_device_batch=3)


def test_resume_with_a_new_schedule_length_follows_the_new_curve(tmp_path):
    """The first resumed iteration already uses the lr of the new `max_iters`."""
    cfg = small_cfg()
    run(cfg, tmp_path, max_iters=6, stop_at=2)
    run(cfg, tmp_path, max_iters=10, stop_at=3, resume=True)
    lrs = [r["lr"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "train"]
    assert lrs[2] == pytest.approx(poly_lr(2, 10, cfg.train.lr, cfg.train.min_lr))


def test_sync_bn_only_with_several_cuda_processes():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert collectives.use_sync_bn("auto", 8, cuda)
    assert collectives.use_sync_bn("syncbn", 2, cuda)
    assert not collectives.use_sync_bn("auto", 1, cuda)  # one process: plain BN
    assert not collectives.use_sync_bn("syncbn", 1, cuda)
    assert not collectives.use_sync_bn("auto", 2, cpu)  # torch's SyncBatchNorm is CUDA-only
    assert not collectives.use_sync_bn("batchnorm", 8, cuda)
    with pytest.raises(ValueError, match="CUDA"):
        collectives.use_sync_bn("syncbn", 2, cpu)
    with pytest.raises(ValueError, match="train.norm"):
        collectives.use_sync_bn("groupnorm", 1, cpu)


def test_global_batch_decomposition():
    assert batch_decomposition(16, 8) == (2, 1)  # the published 8 GPUs x 2
    assert batch_decomposition(16, 1, 2) == (2, 8)  # one GPU: 8 accumulation steps
    assert batch_decomposition(16, 2, 4) == (4, 2)
    assert batch_decomposition(8, 8) == (1, 1)  # Cityscapes
    with pytest.raises(ValueError, match="cannot be split"):
        batch_decomposition(16, 3)
    with pytest.raises(ValueError, match="valid values"):
        batch_decomposition(16, 2, 3)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    code = train_cli.main(["--config", "upernet_small_test", "--out", str(out), "--max-iters", "2",
                           "--no-progress", "--no-val", "--train.lr=0.02", "--train.log_interval=1"])
    assert code == 0
    records = read_log(out / "log.jsonl")
    assert [r["iter"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(0.02)
    assert (out / "last.pt").exists() and (out / "config.json").exists()
    assert train_cli.main(["--config", "upernet_small_test", "--train.lr=fast"]) == 2
    assert "train.lr is a float" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--config", "upernet_small_test", "--bogus"])


def test_command_line_errors_are_one_line_and_name_the_problem(tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["--config", "upernet_small_test", "--out", str(out), "--no-progress", "--no-val"]
    assert train_cli.main(base + ["--max-iters", "4", "--data-root", str(tmp_path)]) == 0
    assert "--data-root" in capsys.readouterr().out  # not used by the demo data: said so
    # resuming beyond the new schedule's end: found before any work, so exit 2 (README)
    assert train_cli.main(base + ["--max-iters", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("upernet train: error: ") and "iteration 4" in err
    assert "--max-iters 4" in err and "Traceback" not in err
    # a weights file that does not exist
    assert train_cli.main(base + ["--max-iters", "1", "--weights", str(tmp_path / "no.pt"),
                                  "--out", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("upernet train: error: ") and "no.pt" in err and err.count("\n") == 1


def test_fast_flag_sets_the_device_s_fast_training_settings(tmp_path, monkeypatch):
    import json

    from upernet_ref.perf.hardware import cpu_has_native_bf16
    out = tmp_path / "fast"
    base = ["--config", "upernet_small_test", "--out", str(out), "--max-iters", "2",
            "--no-progress", "--no-val", "--device", "cpu", "--fast"]
    real, trained = train_cli.fast_train_model, []
    monkeypatch.setattr(train_cli, "fast_train_model",
                        lambda model, device: trained.append(real(model, device)) or model)
    assert train_cli.main(base) == 0
    assert len(trained) == 1  # the model trained with --fast went through fast_train_model
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["amp"] == ("bf16" if cpu_has_native_bf16() else "none")
    assert saved["channels_last"] is True and saved["compile"] is False  # no compile on CPU
    assert train_cli.main(base + ["--train.amp=none", "--train.channels_last=false",
                                  "--overwrite"]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["amp"] == "none" and saved["channels_last"] is False  # explicit ones win


def test_fast_training_model_applies_what_the_final_configuration_says():
    from upernet_ref.perf.fast import CLASSIFIERS
    for amp, channels_last in (("bf16", True), ("none", False)):
        model = build_model(override(small_cfg(), {"train.amp": amp,
                                                   "train.channels_last": channels_last}))
        assert train_cli.fast_train_model(model, "cpu") is model
        classifiers = [model.get_submodule(name) for name in CLASSIFIERS]
        assert all(bool(c._forward_hooks) is (amp == "bf16") for c in classifiers)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(bool(c._forward_pre_hooks) is channels_last for c in convs)


def test_a_second_run_into_the_same_folder_stops_before_any_work(tmp_path):
    from upernet_ref.errors import UsageError
    with runs.run_folder_lock(tmp_path / "run"):  # the first run, still going
        with pytest.raises(UsageError, match=rf"{tmp_path / 'run'} is used by another training "
                                             rf"run \(pid {os.getpid()} on .*\): wait for it"):
            run(small_cfg(), tmp_path / "run", max_iters=1)
    assert run(small_cfg(), tmp_path / "run", max_iters=1).iteration == 1  # released: runs
    assert not (tmp_path / "run" / ".lock").exists()
