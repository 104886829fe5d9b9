"""Which `train --fast` choices pay on the CPU (issue 21 item 2; figures in docs/benchmarks.md).

    python benchmarks/fast_train_options.py [SIZE] [ROUNDS]     # R-50 os8 ADE20K, batch 2
    python benchmarks/fast_train_options.py profile [SIZE]      # where a step's time goes

The trainer's step (`bench.prepare_training`, batch 2, SIZE x SIZE, default 512) from the same
weights and batch: fp32 eager; `train --fast` before issue 21 item 2 (bf16 autocast +
channels_last); the same with the logits upsampled in float32 (`fast.float32_logits`); and
today's `train --fast` (also `fast.channels_last_conv_inputs`). One untimed step each, then
ROUNDS (default 3) interleaved rounds; per path the median wall and process CPU seconds, the
median per-round ratio to eager, and its first-step loss next to eager's.
`profile`: torch.profiler over one step (after an untimed one) of fp32 eager, `train --fast`
before item 2 and today's, side by side: the self time of the 30 costliest operators.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from upernet_ref import build_model, configs
from upernet_ref.perf.bench import prepare_training
from upernet_ref.perf.fast import default_fast_settings


def prepared(size: int) -> tuple[dict, dict]:
    """The four paths (`bench.prepare_training`) from the same weights and batch, each after
    one untimed step, and their descriptions."""
    cfg = configs.get_config("upernet_r50_os8_ade20k")
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=generator)
    labels = torch.randint(0, cfg.model.num_classes, (2, size, size), generator=generator)
    fast = default_fast_settings("cpu")
    before = dataclasses.replace(fast, train_float32_logits=False,
                                 train_channels_last_inputs=False)
    variants = {"eager fp32": None, "fast before": before,
                "+ float32 logits": dataclasses.replace(before, train_float32_logits=True),
                "fast now": fast}
    paths, described = {}, {}
    for name, settings in variants.items():
        model = build_model(cfg)
        model.load_state_dict(state)
        paths[name], described[name] = prepare_training(model, images, labels,
                                                         torch.device("cpu"), cfg, settings)
        paths[name].call()  # untimed; its loss is from the shared weights
        print(f"{name}: {described[name]['train_settings']}", flush=True)
    return paths, described


def profile(size: int = 512) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    paths, _ = prepared(size)
    seconds = {}
    for name in ("eager fp32", "fast before", "fast now"):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            paths[name].call()
        seconds[name] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    names = list(seconds)
    print(f"{'operator (self time, s)':45s}" + "".join(f"{n:>14s}" for n in names))
    for key in sorted(seconds["fast before"], key=lambda k: -seconds["fast before"][k])[:30]:
        print(f"{key[:45]:45s}" + "".join(f"{seconds[n].get(key, 0.0):14.2f}" for n in names))
    print(f"{'total':45s}" + "".join(f"{sum(seconds[n].values()):14.2f}" for n in names))


def main(size: int = 512, rounds: int = 3) -> None:
    paths, described = prepared(size)
    walls = {name: [] for name in paths}
    cpus = {name: [] for name in paths}
    for r in range(rounds):
        for name, path in paths.items():
            wall, cpu = time.perf_counter(), time.process_time()
            path.call()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
        print(f"round {r}", {n: (round(walls[n][-1], 1), round(cpus[n][-1], 1)) for n in paths},
              flush=True)
    eager = "eager fp32"
    for name in paths:
        wall = statistics.median(e / t for e, t in zip(walls[eager], walls[name]))
        cpu = statistics.median(e / t for e, t in zip(cpus[eager], cpus[name]))
        print(f"{name:18s} wall {statistics.median(walls[name]):7.1f} s  cpu "
              f"{statistics.median(cpus[name]):7.1f} s  vs eager: {wall:.2f}x wall, {cpu:.2f}x CPU"
              f"  first loss {described[name]['train_first_loss']:.6f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["profile"]:
        profile(*(int(a) for a in sys.argv[2:3]))
    else:
        main(*(int(a) for a in sys.argv[1:3]))
