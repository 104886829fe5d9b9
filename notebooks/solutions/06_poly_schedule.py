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
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · SGD and the poly learning-rate schedule
#
# All 12 **published recipes** use the same optimiser (docs/SPEC.md, "Training recipe"): **SGD**, base lr 0.01,
# momentum 0.9, weight decay 5e-4 on *all* parameters (BatchNorm and biases included), no
# nesterov, no gradient clipping, and the **poly** schedule of DeepLab, stepped every iteration:
#
# $$\mathrm{lr}(it) = (\mathrm{base} - \mathrm{min})\,\Big(1 - \frac{it}{\mathrm{max\_iters}}\Big)^{0.9} + \mathrm{min},
# \qquad \mathrm{min} = 0.01 \times \mathrm{base} = 10^{-4},$$
#
# with no warmup. The recipes are stated in **epochs**; the trainer counts **iterations**.
#
# **The paper's authors** train differently (docs/SPEC.md, "Paper vs published recipe"): SGD with
# lr 0.02 and weight decay 1e-4, the same poly power 0.9, for 30 epochs of 5,000 iterations
# (ResNet-50) at 2 images x 8 GPUs. What follows is the published recipe.

# %%
# %matplotlib inline
import copy
import inspect

import matplotlib.pyplot as plt
import torch

from upernet_ref import course
from upernet_ref.training import schedule
from upernet_ref.configs import TrainConfig, get_config

_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. From epochs to iterations, for the three datasets
#
# One iteration consumes one global batch, so an epoch is images / batch iterations (the model
# card's figures are that ratio rounded to the nearest integer) and the schedule length is
# epochs x iterations per epoch. The configurations store both numbers.
#
# ### Exercise 1 (warm-up, checked): epochs to iterations
#
# Write `epochs_to_iters(epochs, num_images, batch_size)` by that rule (round images / batch to
# the nearest integer, at least one iteration an epoch). `check_epochs_to_iters` tries the three
# published datasets and eleven random sizes; the table below then uses the package.

# %%
def epochs_to_iters(epochs: int, num_images: int, batch_size: int) -> int:
    ### BEGIN SOLUTION
    return epochs * max(1, int(num_images / batch_size + 0.5))
    ### END SOLUTION


course.check_epochs_to_iters(epochs_to_iters)

# %%
train_images = {"voc": 10_582, "ade20k": 20_210, "cityscapes": 2_975}  # docs/SPEC.md, "The 12 published results"
print(f"{'dataset':<11} {'images':>7} {'batch':>5} {'epochs':>6} {'it/epoch':>8} {'max_iters':>9}")
for dataset in ("voc", "ade20k", "cityscapes"):
    cfg = get_config(f"upernet_r50_os8_{dataset}")
    per_epoch = schedule.iters_per_epoch(train_images[dataset], cfg.train.batch_size)
    assert per_epoch == cfg.train.iters_per_epoch
    assert schedule.epochs_to_iters(cfg.train.epochs, train_images[dataset], cfg.train.batch_size) == cfg.train.max_iters
    print(f"{dataset:<11} {train_images[dataset]:>7} {cfg.train.batch_size:>5} {cfg.train.epochs:>6} "
          f"{per_epoch:>8} {cfg.train.max_iters:>9}")

# %% [markdown]
# ## 2. The poly schedule
#
# ### Exercise 2 (core, checked): write the schedule before you read it
#
# Write `poly_lr` with its optional linear warmup (the formula at the top of this notebook;
# during warmup multiply by 1 - (1 - it / warmup_iters) x (1 - warmup_ratio); past `max_iters`
# stay at the minimum). `check_poly_lr` tries twenty cases (warmup, its end, the last iteration
# and beyond included) and names the usual mistakes.

# %%
def poly_lr(iteration: int, max_iters: int, base_lr: float, min_lr: float, power: float,
            warmup_iters: int, warmup_ratio: float) -> float:
    ### BEGIN SOLUTION
    progress = min(max(iteration, 0), max_iters) / max_iters
    lr = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    if warmup_iters > 0 and iteration < warmup_iters:
        lr *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return lr
    ### END SOLUTION


course.check_poly_lr(poly_lr)

# %% [markdown]
# The package's version, to compare with yours:

# %%
print(inspect.getsource(schedule.poly_lr))

# %% [markdown]
# ## 3. The curve
#
# The exponent 0.9 keeps the lr a little above the straight line for most of the run and drops
# it faster at the end; `min_lr` keeps the last updates from vanishing entirely.

# %%
cfg = get_config("upernet_r50_os8_ade20k")
T = cfg.train.max_iters
its = list(range(0, T + 1, 500))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for power in (0.9, 1.0, 2.0):
    axes[0].plot(its, [schedule.poly_lr(i, T, 0.01, 1e-4, power) for i in its], label=f"power {power}")
axes[0].set(xlabel="iteration (thousands)", ylabel="lr", title=f"poly, ADE20K ({T:,} iterations)")
axes[0].xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
axes[0].legend()
warm = list(range(0, 3001, 20))
axes[1].plot(warm, [schedule.poly_lr(i, T, 0.01) for i in warm], label="no warmup (published)")
axes[1].plot(warm, [schedule.poly_lr(i, T, 0.01, warmup_iters=1500, warmup_ratio=0.1) for i in warm],
             label="linear warmup 1500 it, ratio 0.1")
axes[1].set(xlabel="iteration", title="the first 3000 iterations")
axes[1].legend()
plt.show()

# %%
for it in (0, T // 4, T // 2, 3 * T // 4, T - 1, T):
    print(f"iteration {it:>6}: lr {schedule.poly_lr(it, T, 0.01):.6f}")
assert abs(schedule.poly_lr(T // 2, T, 0.01) - (0.0099 * 0.5 ** 0.9 + 1e-4)) < 1e-12

# %% [markdown]
# ### Exercise 3 (stretch, checked): a whole run's learning rates, new or resumed
#
# Write `lr_curve(train_cfg, start)`: the list of learning rates the optimiser uses at each
# iteration of the run that `train_cfg` describes, from iteration `start` (0 for a new run, the
# checkpoint's iteration for a resumed one) to its last, `max_iters - 1`. Everything comes from
# the configuration: the length, `max_iters` = `epochs` x `iters_per_epoch`; the curve, `lr`,
# `min_lr`, `lr_power`; the warmup, `warmup_iters` and `warmup_ratio` (your `poly_lr` does the
# arithmetic). What to get right: the scheduler steps once per *iteration*, after the update,
# so iteration `it` uses lr(it); a resumed run continues on the same curve, it does not start a
# new one. `check_lr_curve` tries small runs with and without warmup, resumed before, inside
# and after the warmup and at the last iteration, the published VOC schedule (39,660 values) and
# the ADE20K one resumed at 160,000; the package's `poly_lr` and `PolyLR` are blocked meanwhile.

# %%
def lr_curve(train_cfg: TrainConfig, start: int) -> list[float]:
    ### BEGIN SOLUTION
    tc = train_cfg
    return [poly_lr(it, tc.max_iters, tc.lr, tc.min_lr, tc.lr_power, tc.warmup_iters, tc.warmup_ratio)
            for it in range(start, tc.max_iters)]
    ### END SOLUTION


course.check_lr_curve(lr_curve)

# %% [markdown]
# ## 4. The optimiser and the scheduler the trainer uses
#
# `build_optimizer` puts every parameter in one group (one lr, one weight decay);
# `build_scheduler` wraps `poly_lr` as a torch scheduler (`PolyLR`), stepped after every
# optimiser step. Its state (the iteration) goes into the checkpoint, so a resumed run continues
# on the same curve.

# %%
from upernet_ref.model import build_model

small = get_config("upernet_small_demo")
model = build_model(small)
opt = schedule.build_optimizer(model, small.train)
sched = schedule.build_scheduler(opt, small.train)
group = opt.param_groups[0]
print(f"{len(opt.param_groups)} group, {len(group['params'])} tensors, lr {group['lr']}, "
      f"momentum {group['momentum']}, weight decay {group['weight_decay']}, nesterov {group['nesterov']}")
seen = []
for it in range(small.train.max_iters):
    seen.append(opt.param_groups[0]["lr"])
    opt.step()   # (no gradients here: only the schedule matters)
    sched.step()
expected = [schedule.poly_lr(i, small.train.max_iters, small.train.lr, small.train.min_lr) for i in range(len(seen))]
assert seen == expected
print(f"{small.name}: {small.train.max_iters} iterations, lr {seen[0]:.4f} -> {seen[-1]:.6f}")

# %% [markdown]
# ### The whole run, with warmup and a resume, against `PolyLR`
#
# Your curve for a 2,000-iteration run with a linear warmup (the lr ramps from `warmup_ratio` x
# poly to poly over `warmup_iters`: an option, off in the published recipe), against the
# learning rates the optimiser actually used when `PolyLR` steps it once per iteration; then the
# same run stopped at iteration 1,500 and resumed from what a checkpoint keeps (the optimiser's
# and the scheduler's states), against your curve from 1,500:

# %% tags=["uses-exercise"]
run = get_config("upernet_small_demo", {"train.epochs": 10, "train.iters_per_epoch": 200,
                                        "train.warmup_iters": 200, "train.warmup_ratio": 0.1}).train
stop = 1500


def sgd_and_poly(run):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=run.lr, momentum=0.9)
    return opt, schedule.build_scheduler(opt, run)


opt, sched = sgd_and_poly(run)
used = []
for it in range(run.max_iters):
    if it == stop:
        checkpoint = copy.deepcopy({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    used.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
opt, sched = sgd_and_poly(run)  # a new process: fresh objects, then the checkpoint's states
opt.load_state_dict(checkpoint["optimizer"])
sched.load_state_dict(checkpoint["scheduler"])
resumed = []
for it in range(stop, run.max_iters):
    resumed.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
mine, mine_resumed = lr_curve(run, 0), lr_curve(run, stop)
for package, yours in ((used, mine), (resumed, mine_resumed)):
    torch.testing.assert_close(torch.tensor(package, dtype=torch.float64),
                               torch.as_tensor(yours, dtype=torch.float64), rtol=1e-12, atol=0)
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.plot(used, label="PolyLR (what the optimiser used)", lw=3, alpha=0.5)
ax.plot(mine, "--", label="your lr_curve(run, 0)")
ax.plot(range(stop, run.max_iters), resumed, ":", lw=3, label=f"resumed at {stop}")
ax.set(xlabel="iteration", ylabel="lr", title=f"{run.max_iters} iterations, warmup {run.warmup_iters}")
ax.legend()
plt.show()
print(f"{run.max_iters} learning rates == PolyLR, and the {len(resumed)} after the resume at {stop}; "
      f"peak {max(used):.5f} at iteration {used.index(max(used))}")

# %% [markdown]
# ## Summary
#
# - SGD (0.01, momentum 0.9, weight decay 5e-4 everywhere), poly power 0.9 per iteration,
#   min lr 1e-4, no warmup: the same for all 12 recipes.
# - Iterations: VOC 661 x 60 = 39,660; ADE20K 1,263 x 130 = 164,190; Cityscapes 372 x 220 = 81,840.
# - The schedule is a pure function of the iteration: a run uses lr(start), ..., lr(max_iters - 1),
#   and resuming needs only the iteration (the checkpoint's optimiser and scheduler states).

# %% [markdown]
# ## Questionnaire
#
# 1. What are the published optimiser's lr, momentum and weight decay, and which parameters get
#    weight decay? And the paper's authors'?
#    <!-- BEGIN ANSWER -->
#    *Published: lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter (BN and biases too).
#    The authors': lr 0.02, weight decay 1e-4.*
#    <!-- END ANSWER -->
# 2. How many iterations is the ADE20K schedule, and how is it derived?
#    <!-- BEGIN ANSWER -->
#    *164,190 = 130 epochs x 1,263 iterations per epoch (20,210 images / global batch 16).*
#    <!-- END ANSWER -->
# 3. Why is the scheduler stepped per iteration rather than per epoch?
#    <!-- BEGIN ANSWER -->
#    *The poly curve is defined on iterations; stepping per epoch would hold the lr flat for 1,263
#    updates at a time.*
#    <!-- END ANSWER -->
# 4. What does a resumed run need to continue on the same curve?
#    <!-- BEGIN ANSWER -->
#    *Only the iteration: the lr is a pure function of it (the scheduler state in the checkpoint).*
#    <!-- END ANSWER -->
# 5. What does `min_lr` change at the end of a run?
#    <!-- BEGIN ANSWER -->
#    *The last updates keep lr 1e-4 instead of decaying to zero.*
#    <!-- END ANSWER -->
#
# ## Going further
#
# 1. With 4 GPUs and the same global batch nothing changes in this schedule. What would change
#    if you halved the global batch instead (linear scaling rule)?
# 2. At which iteration of the ADE20K schedule has the lr dropped to half its base value?
# 3. Add a 1,500-iteration warmup with `--train.warmup_iters=1500` and plot the first 3,000
#    learning rates from a run's `log.jsonl`.
