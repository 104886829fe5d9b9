"""Two processes (DDP, gloo on CPU) train like one process with the same global batch.

Global batch 4. Two processes with 2 images each, against one process with 2 images per step
and 2 accumulation steps. On CPU there is no SyncBN (torch's SyncBatchNorm is CUDA-only), so
each process normalises its own 2 images with plain BN, and so does each micro-step of the
single process; `GlobalBatchOrder` gives process r and micro-step r the same 2 images. Then:
- the BN batch statistics, hence the forward passes, are the same computation;
- the gradients are the same mean: DDP averages the 2 processes' gradients, the single process
  accumulates both micro-steps' (loss / 2);
- dropout is switched off (the two runs draw different masks), and the data has no ignored
  pixels, so every micro-batch's mean cross-entropy has the same number of pixels.
The losses and the parameters after 3 SGD steps must agree to float tolerance: sums in another
order differ by ~1e-7 relative, which 3 steps at lr 0.05 grow to ~1e-4 in the weights, while
the weights themselves move by more than 1e-2. The BN
running statistics are *not* compared: DDP keeps rank 0's (it broadcasts its buffers), the
single process has seen both halves. (With SyncBN on GPUs, 2 x 2 images would match one process
with 4 images and no accumulation instead.)
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from upernet_ref.checkpoints import read_checkpoint_file
from upernet_ref.configs import get_config, override
from upernet_ref.runs import read_log

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


class NoIgnoreScenes(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        mask = torch.randint(0, 8, (4, 4), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
        image = torch.stack([mask.float() / 8, 1 - mask.float() / 8, mask.float() % 2])
        return image + 0.1 * torch.randn(image.shape, generator=g), mask


def _cfg():
    return override(get_config("upernet_small_test"),
                    {"model.dropout": 0.0, "train.log_interval": 1, "train.val_interval": 0,
                     "train.checkpoint_interval": 100})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from upernet_ref.cli.train import run_training
    result = run_training(_cfg(), out_dir=out, device="cpu", per_device_batch=2, max_iters=3,
                   train_dataset=NoIgnoreScenes(), validate=False, progress=False,
                   tensorboard=False, handle_signals=False, log=lambda *_: None)
    assert (result.world_size, result.per_device_batch, result.accumulation) == (2, 2, 1)
    assert not dist.is_initialized(), "run_training() must leave the process group"


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)

    from upernet_ref.cli.train import run_training
    single = run_training(_cfg(), out_dir=tmp_path / "one", device="cpu", per_device_batch=2,
                   max_iters=3, train_dataset=NoIgnoreScenes(), validate=False, progress=False,
                   tensorboard=False, log=lambda *_: None)
    assert (single.world_size, single.per_device_batch, single.accumulation) == (1, 2, 2)

    ddp = read_checkpoint_file(tmp_path / "ddp" / "last.pt")
    one = read_checkpoint_file(tmp_path / "one" / "last.pt")
    assert ddp["iteration"] == one["iteration"] == 3
    assert ddp["model"].keys() == one["model"].keys()
    for key, value in one["model"].items():
        if "running_" in key or "num_batches_tracked" in key:
            continue
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-3, atol=5e-4, msg=key)
    ddp_losses = [r["loss"] for r in read_log(tmp_path / "ddp" / "log.jsonl")]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single.losses),
                               rtol=0, atol=1e-4)
    # and the check is not vacuous: the weights did move away from the initialisation
    from upernet_ref.model import build_model
    torch.manual_seed(0)
    init = build_model(_cfg()).state_dict()
    moved = max((one["model"][k] - init[k]).abs().max().item()
                for k in init if init[k].is_floating_point())
    assert moved > 1e-2


def _skip_worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import json
    from upernet_ref.data.datasets import open_dataset, skipped_samples
    from upernet_ref.data.transforms import test_transform
    from upernet_ref.evaluation.evaluate import evaluate
    from upernet_ref.model import build_model
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        train_set = open_dataset("folder", root, "train", on_bad="skip")
        train_set[(4, 1)[rank]]  # rank 0 meets bad item 4 only, rank 1 bad item 1 only
        counted = skipped_samples(train_set)
        cfg = get_config("upernet_small_test", ["data.dataset=folder", "data.num_classes=3",
                                                "data.on_bad=skip"])
        torch.manual_seed(0)
        val = open_dataset("folder", root, "train", transform=test_transform(cfg.data))
        metrics = evaluate(build_model(cfg), val, cfg, progress=False)  # each rank evaluates every other item
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump({"train": counted, "eval": metrics["skipped_samples"],
                       "images": metrics["num_images"]}, f)
    finally:
        dist.destroy_process_group()


def test_skipped_samples_are_counted_across_ranks(tmp_path):
    """`data.on_bad=skip` under torchrun: each rank meets its own bad items; every rank
    reports all of them (training) and evaluation leaves all of them out."""
    import json
    import numpy as np
    from helpers_data import make_fake_folder, save_index_png
    root = make_fake_folder(tmp_path, n=6)
    for k in (1, 4):  # one bad item in each rank's evaluation shard (0, 2, 4 and 1, 3, 5)
        save_index_png(np.full((24, 32), 9), root / "masks" / "train" / f"img{k}.png")
    mp.spawn(_skip_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert sorted(report["train"]) == sorted(report["eval"]) == [
            f"image {root}/images/train/img{k}.jpg, label {root}/masks/train/img{k}.png"
            for k in (1, 4)]
        assert report["images"] == 4  # 6 - the 2 bad ones
