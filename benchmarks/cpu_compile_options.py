"""Which CPU fast path to compile (issue 21; figures in docs/benchmarks.md, "Zen 5" section).

    python benchmarks/cpu_compile_options.py infer [CONFIG] [SIZE]          # ~5-8 min loaded
    python benchmarks/cpu_compile_options.py train [CONFIG] [SIZE] [ROUNDS] # ~25-40 min loaded

`infer`: R-50 os8 (default) at SIZE x SIZE, batch 1: fp32 eager, today's uncompiled `--fast`
(BN folded, bf16 with the fp32 islands, channels_last), and under torch.compile with inductor's
freezing: the same bf16 model, bf16 without the fp32 islands, and fp32 folded; their argmax
agreement with eager on the same (random) weights, their first (compiling) call, and 3
interleaved rounds (median per-round ratio of wall and process CPU time).
`train`: the trainer's step (`bench.prepare_training`, batch 2): fp32 eager, bf16 autocast +
channels_last (today's `train --fast` on the CPU), and the same under torch.compile; ROUNDS
interleaved rounds after one untimed step each (the compiled one compiles in it).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from upernet_ref import build_model, configs
from upernet_ref.perf.bench import prepare_training, warm_up
from upernet_ref.perf.fast import FastSettings, fast_inference_model


def interleaved(paths: dict, rounds: int) -> None:
    times = {n: [] for n in paths}
    cpus = {n: [] for n in paths}
    for r in range(rounds):
        for n, f in paths.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            times[n].append(time.perf_counter() - w)
            cpus[n].append(time.process_time() - c)
        print("round", r, {n: round(t[-1], 3) for n, t in times.items()}, flush=True)
    first = next(iter(paths))
    for n in paths:
        ratios = [e / t for e, t in zip(times[first], times[n])]
        cpu_ratios = [e / t for e, t in zip(cpus[first], cpus[n])]
        print(f"{n:24s} wall {statistics.median(times[n]):.3f}s  speedup wall "
              f"{statistics.median(ratios):.2f}x cpu {statistics.median(cpu_ratios):.2f}x",
              flush=True)


def infer(cfg: configs.Config, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, size, size)

    def call(m):
        def f():
            with torch.no_grad():
                return m(x)["out"]
        return f

    paths = {"eager": call(model),
             "fast_now": call(fast_inference_model(model, "cpu", compile=False))}
    variants = {"compiled_bf16_islands": dict(), "compiled_bf16_all": dict(float32_modules=()),
                "compiled_fp32": dict(dtype=None)}
    for name, kw in variants.items():
        fm = fast_inference_model(model, "cpu", compile=True, compile_after_s=0, **kw)
        t = time.perf_counter()
        f = call(fm)
        f()
        print(name, "first call", time.perf_counter() - t, flush=True)
        paths[name] = f
    ref = paths["eager"]()
    for n, f in paths.items():
        print(n, "agree", (f().argmax(1) == ref.argmax(1)).float().mean().item(), flush=True)
    interleaved(paths, 3)


def train(cfg: configs.Config, size: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g)
    labels = torch.randint(0, cfg.model.num_classes, (2, size, size), generator=g)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    paths = {}
    for name, s in (("eager", None), ("bf16_cl", FastSettings(torch.bfloat16, True, False)),
                    ("bf16_cl_compiled", FastSettings(torch.bfloat16, True, True))):
        m = build_model(cfg)
        m.load_state_dict(state)
        t = time.perf_counter()
        p, d = prepare_training(m, images, labels, torch.device("cpu"), cfg, settings=s)
        warm_up(p, torch.device("cpu"), 1)
        print(name, d, "first calls", time.perf_counter() - t, flush=True)
        paths[name] = p.call
    interleaved(paths, rounds)


if __name__ == "__main__":
    what = sys.argv[1]
    cfg = configs.get_config(sys.argv[2] if len(sys.argv) > 2 else "upernet_r50_os8_ade20k")
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    if what == "infer":
        infer(cfg, size)
    else:
        train(cfg, size, int(sys.argv[4]) if len(sys.argv) > 4 else 2)
