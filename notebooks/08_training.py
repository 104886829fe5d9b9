# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Training: the whole recipe, on a laptop
#
# `upernet_ref.training.trainer` runs the published recipe (spec section 3) on a CPU, one GPU or many:
# one loop in which every process takes its part of the **global batch** (16, or 8 for
# Cityscapes), accumulates gradients over micro-batches when memory is short, checks the loss
# is finite, and takes one SGD step and one poly-schedule step. Here we run it end to end on the
# embedded demo scenes with `upernet_small_demo` (a narrow ResNet-18 UPerNet) for well under a
# minute, look at the logs, the checkpoint and the predictions, and resume the run.
#
# On the command line the same run is `upernet train --config upernet_small_demo --max-iters 40`.

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from upernet_ref import configs
from upernet_ref.checkpoints import read_checkpoint_file
from upernet_ref.cli.demo import chance_miou, prediction_figure
from upernet_ref.training.distributed import GlobalBatchOrder, batch_decomposition
from upernet_ref.training.logs import plot_curves, read_log
from upernet_ref.model import build_model
from upernet_ref.data.synthetic import DemoScenes
from upernet_ref.training.trainer import train

_ = torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = configs.get_config("upernet_small_demo")
print(cfg.name, "| crop", cfg.data.crop_size, "| global batch", cfg.train.batch_size,
      "| lr", cfg.train.lr, "| full recipe", cfg.train.max_iters, "iterations")

# %% [markdown]
# ## 1. The global batch, whatever the hardware
#
# `per-device batch x processes x accumulation steps = global batch`. With 8 GPUs and the
# ADE20K recipe that is 2 x 8 x 1; on one GPU that holds 8 images, 8 x 1 x 2; on a CPU the
# whole share at once. Which images form global batch `it` depends only on the seed and `it`
# (an endless stream of seeded epoch permutations), so any decomposition sees the same data,
# and a resumed run continues exactly.

# %%
for world, per_device in [(8, 2), (1, 8), (2, 4), (1, None)]:
    b, steps = batch_decomposition(16, world, per_device)
    print(f"{world} process(es): {b:>2} per device x {world} x {steps} step(s) = 16")
order = GlobalBatchOrder(num_items=400, global_batch=8, seed=0)
print("global batch 0:", [i for i, _ in order.stream(0, 8)])
print("process 1 of 2, per-device 2, its 2 micro-batches:",
      [[i for i, _ in mb] for mb in order.micro_batches(0, rank=1, world_size=2, per_device_batch=2)])

# %% [markdown]
# ## 2. A short run
#
# 40 iterations of the recipe (poly schedule over those 40), validating on 20 val scenes at the
# end. Everything goes to `out_dir`: `last.pt` (and `best.pt`), `log.jsonl`, `curves.png`,
# TensorBoard events in `tb/`, and `config.json`.

# %%
# NBVAL_IGNORE_OUTPUT
# (speeds and times vary)
out_dir = Path(tempfile.mkdtemp()) / "run"
val_set = DemoScenes("val", num_samples=20)
result = train(cfg, out_dir=out_dir, device=device, max_iters=40, progress=False,
               val_dataset=val_set, tensorboard=False)

# %%
records = read_log(out_dir / "log.jsonl")
train_records = [r for r in records if r["kind"] == "train"]
val_records = [r for r in records if r["kind"] == "val"]
print(f"{len(train_records)} train records, {len(val_records)} validation; files:",
      sorted(p.name for p in out_dir.iterdir()))
first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
assert last < 0.75 * first, (first, last)
chance = chance_miou(val_set, cfg.data.num_classes)
assert val_records[-1]["miou"] > 2 * chance
print(f"loss fell by more than 25%; val mIoU above twice the chance level ({100 * chance:.1f}%)")

# %%
# NBVAL_IGNORE_OUTPUT
# (trained numbers vary with the machine's float arithmetic)
print(f"loss: first 5 iterations {first:.2f}, last 5 {last:.2f}; val mIoU {100 * val_records[-1]['miou']:.1f}%")

# %%
_ = plot_curves(records, title=f"{cfg.name}, 40 iterations")
plt.show()

# %% [markdown]
# ## 3. The checkpoint, and the predictions
#
# `last.pt` holds everything needed to continue exactly: weights, optimiser state (momentum),
# scheduler, AMP scaler, the random states of every process, the iteration (hence the data
# position) and the configuration. It is written atomically (a temporary file, `fsync`, then a
# rename), so a crash during the save leaves the previous checkpoint intact.

# %%
ckpt = read_checkpoint_file(out_dir / "last.pt")
print(sorted(ckpt))
print("iteration", ckpt["iteration"], "| epoch", ckpt["epoch"], "| position in the epoch", ckpt["position"])
model = build_model(configs.from_dict(ckpt["config"]))
_ = model.load_state_dict(ckpt["model"])
model.to(device)
fig = prediction_figure(model, val_set, cfg, count=3, device=device)
plt.show()

# %% [markdown]
# ## 4. Resuming
#
# Stop a run early (`stop_at`, or SIGTERM / Ctrl-C, which save `last.pt` first) and continue
# with `resume=True` (`--resume`): the losses after the resume are those the uninterrupted run
# would have produced (`tests/test_train.py` checks it to 1e-6).

# %%
# NBVAL_IGNORE_OUTPUT
# (speeds vary)
tiny = configs.override(cfg, {"train.log_interval": 1})
split_dir = Path(tempfile.mkdtemp())
a = train(tiny, out_dir=split_dir / "full", device=device, max_iters=4, progress=False, validate=False, tensorboard=False)
b1 = train(tiny, out_dir=split_dir / "split", device=device, max_iters=4, stop_at=2, progress=False, validate=False, tensorboard=False)
b2 = train(tiny, out_dir=split_dir / "split", device=device, max_iters=4, resume=True, progress=False, validate=False, tensorboard=False)

# %%
print(f"uninterrupted: {len(a.losses)} iterations | stopped at {b1.iteration} | resumed to {b2.iteration}")
torch.testing.assert_close(torch.tensor(b1.losses + b2.losses), torch.tensor(a.losses), rtol=0, atol=1e-5)
print("losses after the resume match the uninterrupted run")

# %% [markdown]
# ## 5. On a GPU: the first iterations of a published configuration
#
# With a GPU the same call trains a real recipe. Here `upernet_r50_os8_ade20k` (68.9 M
# parameters, 512x512 crops, global batch 16) runs its first iterations on demo scenes
# upscaled by the published train pipeline; the per-device batch is chosen by trying a
# training step and backing off on out-of-memory, the rest of the batch is gradient
# accumulation. (Skipped on a CPU.)

# %%
# NBVAL_IGNORE_OUTPUT
# (GPU only; times vary)
if device == "cuda":
    from upernet_ref.data.transforms import train_transform
    real = configs.override(configs.get_config("upernet_r50_os8_ade20k"), {"train.log_interval": 1, "train.amp": "bf16"})
    scenes = DemoScenes("train", size=(384, 512), transform=train_transform(real.data))
    gpu_run = train(real, out_dir=Path(tempfile.mkdtemp()), device=device, stop_at=5,
                    train_dataset=scenes, validate=False, progress=False, tensorboard=False)
    print("per-device batch", gpu_run.per_device_batch, "x accumulation", gpu_run.accumulation,
          "| losses", [round(x, 3) for x in gpu_run.losses])
else:
    print("no GPU: skipped")

# %% [markdown]
# ## Summary
#
# - One loop for CPU, one GPU and torchrun: the global batch is kept by per-device batch x
#   processes x accumulation; SyncBN with several CUDA processes, BN otherwise.
# - The data order and the augmentations are a function of (seed, iteration), so the
#   decomposition does not change what is learnt, and a resumed run continues exactly.
# - Checkpoints are atomic and complete; SIGTERM/SIGINT save one before stopping; a NaN loss
#   stops the run before the bad update, naming the iteration.
# - Logs: `log.jsonl`, TensorBoard, `curves.png`.
#
# ## Exercises
#
# 1. Run `upernet demo` (or `train(cfg)` with the full 300 iterations) and compare its mIoU with
#    the 40-iteration run here.
# 2. Train with `per_device_batch=4` (2 accumulation steps). Are the losses identical? Why not
#    (hint: BatchNorm statistics)?
# 3. Set `train.lr=5.0` and watch the non-finite-loss check stop the run.
