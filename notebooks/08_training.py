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
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Training: the whole recipe, on a laptop
#
# `upernet_ref.training.trainer` runs the published recipe (docs/SPEC.md, "Training recipe") on a CPU, one GPU or many:
# one loop in which every process takes its part of the **global batch** (16, or 8 for
# Cityscapes), accumulates gradients over micro-batches when memory is short, checks the loss
# is finite, and takes one SGD step and one poly-schedule step. We first write that step by hand
# (loss, gradients, momentum SGD with weight decay, poly lr) and check it against the package's
# pieces; then run the trainer end to end on the embedded demo scenes with `upernet_small_demo`
# (a narrow ResNet-18 UPerNet) for well under a minute, look at the logs and the checkpoint,
# resume the run, and finally load the course's fully trained checkpoint (the payoff: mIoU above
# 75% on the demo val split) and look at its predictions and its feature maps.
#
# On the command line the same run is `upernet train --config upernet_small_demo --max-iters 40`.

# %%
# %matplotlib inline
import copy
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from upernet_ref import course
from upernet_ref import configs
from upernet_ref.checkpoints import read_checkpoint_file, stored_config
from upernet_ref.cli.demo import chance_miou, prediction_figure
from upernet_ref.training.data_order import GlobalBatchOrder, batch_decomposition
from upernet_ref.runs import plot_curves, read_log
from upernet_ref.model import build_model
from upernet_ref.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, DemoScenes
from upernet_ref.cli.train import run_training
from upernet_ref.data.transforms import test_transform, train_transform
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.training.schedule import build_optimizer, build_scheduler
from upernet_ref.training.trainer import train_step

_ = torch.manual_seed(0)
device = course.pick_device()
course.exact_comparisons()  # no TF32 on Ampere+ GPUs: float32 comparisons keep their tolerances
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
# ## Exercise 1 (warm-up, checked): the loss, before you read it
#
# Write the published training loss from the model's outputs: CE of `outputs["out"]` plus 0.4 x
# CE of `outputs["aux"]`, each averaged over the pixels whose label is not 255 (the cross-entropy
# you wrote in notebook 05). `check_segmentation_loss` compares it with
# `training.losses.segmentation_loss`.

# %% tags=["raises-exception"]
def training_loss(outputs: dict, target: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_segmentation_loss(training_loss)

# %% [markdown]
# ## Exercise 2 (core, checked): the SGD update
#
# Write one SGD step with momentum and weight decay for one parameter tensor, as `torch.optim.SGD`
# does (no dampening, no Nesterov): $d = g + \lambda p$, $b \leftarrow \mu\,b + d$,
# $p \leftarrow p - \mathrm{lr}\,b$ (the buffer starts at zero). Return the new parameter and the
# new buffer. `check_sgd_update` tries five steps.

# %% tags=["raises-exception"]
def sgd_update(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float,
               weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_sgd_update(sgd_update)

# %% [markdown]
# ## Exercise 3 (stretch, checked): one training step
#
# Put the pieces together into one iteration of the recipe, as the trainer runs it:
#
# 1. forward in **train mode** (BatchNorm on the batch's statistics; the model returns `out`
#    and, only while training, `aux`);
# 2. the loss CE(out) + 0.4 x CE(aux) over the non-ignored pixels (your `training_loss`);
# 3. the gradients of this step alone (nothing left over from the previous step: zero the
#    `.grad`s before `backward`, or use `torch.autograd.grad`);
# 4. the SGD update of every parameter with its momentum buffer (your `sgd_update`), at the
#    poly lr of this `iteration`: lr = (lr - min_lr) (1 - it / max_iters)^power + min_lr
#    (notebook 06; the recipe has no warmup), all read from `train_cfg`.
#
# `buffers` holds one momentum buffer per parameter (in `model.parameters()` order, zeros before
# the first step): update them and the parameters **in place**, since the next step continues from
# them, and return the loss. `check_training_step` runs a few consecutive steps on a tiny model
# (the published recipe, a run resumed with non-zero buffers, a batch whose every pixel is
# ignored) and compares the loss, every parameter, BatchNorm statistic and buffer after each step;
# the package's `train_step`, its losses and `torch.optim.SGD.step` are blocked meanwhile.

# %% tags=["raises-exception"]
def training_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
                  buffers: list[torch.Tensor], iteration: int, train_cfg: configs.TrainConfig) -> float:
    raise NotImplementedError("exercise: replace this line with your code")


course.check_training_step(training_step)

# %% [markdown]
# ## 2. Your training step against the package's
#
# One iteration of the recipe, as you wrote it: forward in train mode, loss = CE(out) + 0.4 x
# CE(aux) over the non-ignored pixels, gradients, then SGD with momentum 0.9 and weight decay on
# every parameter, $d = g + \lambda p$, $b \leftarrow 0.9\,b + d$, $p \leftarrow p - \mathrm{lr}\,b$,
# at the poly lr of the iteration. Repeated for a few steps of the real `upernet_small_demo`
# network, it must give the same losses and the same model as the package's training step,
# `training.trainer.train_step` (the one the trainer repeats), with `build_optimizer` and
# `build_scheduler`, driving an identical copy of the model on the same batches (dropout draws
# seeded alike):

# %% tags=["uses-exercise", "raises-exception"]
steps = 3
tc = configs.override(cfg, {"train.epochs": 1, "train.iters_per_epoch": steps}).train  # a 3-iteration run
_ = torch.manual_seed(0)
items = DemoScenes("train", transform=train_transform(cfg.data))
batches = [[torch.stack(t).to(device) for t in zip(*(items[4 * b + i] for i in range(4)))] for b in range(steps)]
_ = torch.manual_seed(0)
package_model = build_model(cfg).to(device).train()
hand_model = copy.deepcopy(package_model)

momentum_buffers = [torch.zeros_like(p) for p in hand_model.parameters()]
hand_losses = []
for it, (x, y) in enumerate(batches):
    _ = torch.manual_seed(100 + it)  # the dropout draws
    hand_losses.append(float(training_step(hand_model, x, y, momentum_buffers, it, tc)))

optimizer = build_optimizer(package_model, tc)
scheduler = build_scheduler(optimizer, tc)
scaler = torch.amp.GradScaler(device.type, enabled=False)  # fp16 only
package_losses = []
for it, (x, y) in enumerate(batches):
    _ = torch.manual_seed(100 + it)
    step_losses = train_step(package_model, (x, y), optimizer, scaler, cfg)
    scheduler.step()
    package_losses.append(step_losses.loss.item())

torch.testing.assert_close(torch.tensor(hand_losses), torch.tensor(package_losses), rtol=1e-5, atol=1e-6)
for (name, a), b in zip(hand_model.state_dict().items(), package_model.state_dict().values()):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
print(f"{steps} steps: the same losses, and all {len(package_model.state_dict())} tensors of the "
      f"model equal (BatchNorm statistics included)")

# %% [markdown]
# (The tolerances: the two losses are computed in a different order, a float32 rounding of
# ~1e-7 that momentum carries along a few steps.)
#
# ## 3. A short run
#
# 40 iterations of the recipe (poly schedule over those 40), validating on 10 val scenes every 10
# iterations (the validation curve has four points). Everything goes to `out_dir`: `last.pt`
# (and `best.pt`), `log.jsonl`, `curves.png`, TensorBoard events in `tb/`, and `config.json`. The validation set gives its items in the test
# pipeline's form, `test_transform(cfg.data)` (normalised, fitted to the base scale), the one
# form `evaluate` takes; the pictures below show the raw scenes.

# %%
# NBVAL_IGNORE_OUTPUT
# (speeds and times vary)
out_dir = Path(tempfile.mkdtemp()) / "run"
val_set = DemoScenes("val", num_samples=10, transform=test_transform(cfg.data))
result = run_training(configs.override(cfg, {"train.val_interval": 10}), out_dir=out_dir, device=device, max_iters=40, progress=False,
                      val_dataset=val_set, tensorboard=False)

# %%
records = read_log(out_dir / "log.jsonl")
train_records = [r for r in records if r["kind"] == "train"]
val_records = [r for r in records if r["kind"] == "val"]
assert len(val_records) == 4
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
# ## 4. The checkpoint, and the predictions
#
# `last.pt` holds everything needed to continue exactly: weights, optimiser state (momentum),
# scheduler, AMP scaler, the random states of every process, the iteration (hence the data
# position) and the configuration. It is written atomically (a temporary file, `fsync`, then a
# rename), so a crash during the save leaves the previous checkpoint intact.

# %%
ckpt = read_checkpoint_file(out_dir / "last.pt")
print(sorted(ckpt))
print("iteration", ckpt["iteration"], "| epoch", ckpt["epoch"], "| position in the epoch", ckpt["position"])
model = build_model(stored_config(ckpt, out_dir / "last.pt"))  # ckpt["config"], checked
_ = model.load_state_dict(ckpt["model"])
model.to(device)
fig = prediction_figure(model, DemoScenes("val", num_samples=3), cfg, count=3, device=device)
course.class_legend(fig, DEMO_CLASSES, DEMO_PALETTE)
plt.show()

# %% [markdown]
# ## 5. Resuming
#
# Stop a run early (`stop_at`, or SIGTERM / Ctrl-C, which save `last.pt` first) and continue
# with `resume=True` (`--resume`): the losses after the resume are those the uninterrupted run
# would have produced (`tests/test_train.py` checks it to 1e-6).

# %%
# NBVAL_IGNORE_OUTPUT
# (speeds vary)
tiny = configs.override(cfg, {"train.log_interval": 1})
split_dir = Path(tempfile.mkdtemp())
a = run_training(tiny, out_dir=split_dir / "full", device=device, max_iters=4, progress=False, validate=False, tensorboard=False)
b1 = run_training(tiny, out_dir=split_dir / "split", device=device, max_iters=4, stop_at=2, progress=False, validate=False, tensorboard=False)
b2 = run_training(tiny, out_dir=split_dir / "split", device=device, max_iters=4, resume=True, progress=False, validate=False, tensorboard=False)

# %%
print(f"uninterrupted: {len(a.losses)} iterations | stopped at {b1.iteration} | resumed to {b2.iteration}")
# On a CPU the resumed run is exact; on a GPU cuDNN's convolution backward may use
# non-deterministic algorithms (atomic adds in another order), so allow float32 noise there
tolerance = 1e-5 if device.type == "cpu" else 1e-3
torch.testing.assert_close(torch.tensor(b1.losses + b2.losses), torch.tensor(a.losses), rtol=0, atol=tolerance)
print("losses after the resume match the uninterrupted run")

# %% [markdown]
# ## 6. The payoff: a fully trained model
#
# The 40 iterations above learn sky and ground. The course ships the same model trained for the
# 900 iterations of `upernet demo` (`notebooks/assets/make_demo_checkpoint.py`, seed 0, a few
# minutes on a laptop CPU): a 2 MB safetensors file of weights only, whose SHA-256
# `course.load_demo_checkpoint` checks before loading it. With the published protocol on the
# whole demo val split it is far above chance:

# %%
trained = course.load_demo_checkpoint(build_model(cfg)).to(device).eval()
full_val = DemoScenes("val")  # raw scenes, for the pictures
metrics = evaluate(trained, DemoScenes("val", transform=test_transform(cfg.data)), cfg, device,
                   progress=False, num_workers=0)
chance_all = chance_miou(full_val, cfg.data.num_classes)
assert metrics["miou"] >= 0.75, metrics["miou"]
print(f"{metrics['num_images']} val images: mIoU >= 75% (chance: {100 * chance_all:.1f}%)")

# %%
# NBVAL_IGNORE_OUTPUT
# (the last digit may differ with the machine's float arithmetic)
print(f"mIoU {100 * metrics['miou']:.1f}%; per class:",
      ", ".join(f"{n} {100 * v:.0f}" for n, v in zip(full_val.classes, metrics["iou"])))

# %%
fig = prediction_figure(trained, full_val, cfg, count=4, device=device)
course.class_legend(fig, DEMO_CLASSES, DEMO_PALETTE)
plt.show()

# %% [markdown]
# What the trained network sees: for one val image, the feature maps C2..C5 of its backbone and
# the PPM's output (each shown as its first principal direction over the channels, so one
# picture per level). C2 follows edges and textures at 1/4 resolution; C5 and the PPM, at 1/8 here
# (output stride 8), respond to whole objects.

# %%
image, _ = full_val[1]
x = test_transform(cfg.data)(image, None)[0][None].to(device)
with torch.no_grad():
    levels = trained.backbone(x)
    levels.append(trained.decode_head.ppm(levels[-1]))


fig, axes = plt.subplots(1, 6, figsize=(16, 2.6))
axes[0].imshow(image.permute(1, 2, 0))
axes[0].set_title("image", fontsize=9)
for ax, f, name in zip(axes[1:], levels, ["C2", "C3", "C4", "C5", "PPM"]):
    centred = f[0].flatten(1).T.double()  # (pixels, channels)
    centred = centred - centred.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # first principal direction
    ax.imshow((centred @ direction).reshape(f.shape[-2:]).cpu(), cmap="magma")
    ax.set_title(f"{name} {tuple(f.shape[1:])}", fontsize=9)
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 7. On a GPU: the first iterations of a published configuration
#
# With a GPU the same call trains a real recipe. Here `upernet_r50_os8_ade20k` (68.9 M
# parameters, 512x512 crops, global batch 16) runs its first iterations on demo scenes
# upscaled by the published train pipeline; the per-device batch is chosen by trying a
# training step and backing off on out-of-memory, the rest of the batch is gradient
# accumulation. (Skipped on a CPU.)

# %%
# NBVAL_IGNORE_OUTPUT
# (GPU only; times vary)
if device.type == "cuda":
    from upernet_ref.data.transforms import train_transform
    real = configs.override(configs.get_config("upernet_r50_os8_ade20k"), {"train.log_interval": 1, "train.amp": "bf16"})
    scenes = DemoScenes("train", size=(384, 512), transform=train_transform(real.data))
    gpu_run = run_training(real, out_dir=Path(tempfile.mkdtemp()), device=device, stop_at=5,
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

# %% [markdown]
# ## Questionnaire
#
# 1. What is the global batch of the published recipes, and how is it kept on one GPU?
# 2. Write the SGD update with momentum and weight decay that the recipe uses.
# 3. What does `last.pt` hold, and why is it written atomically?
# 4. Why is the demo checkpoint a safetensors file checked by SHA-256?
# 5. Why may a resumed run differ from an uninterrupted one on a GPU but not on a CPU?
#
# ## Going further
#
# 1. Run `upernet demo` (or `run_training(cfg)` with the full 300 iterations) and compare its mIoU with
#    the 40-iteration run here.
# 2. Train with `per_device_batch=4` (2 accumulation steps). Are the losses identical? Why not
#    (hint: BatchNorm statistics)?
# 3. Set `train.lr=5.0` and watch the non-finite-loss check stop the run.
