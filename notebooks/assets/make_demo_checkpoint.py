"""Make the course's payoff checkpoint: `upernet_small_demo` trained as `upernet demo` trains it.

    PYTHONPATH=. python notebooks/assets/make_demo_checkpoint.py      # about 1-3 min on 2 CPU cores

Trains `upernet_small_demo` on the embedded demo scenes for 900 iterations (the `upernet demo`
schedule) with the configuration's seed (`cfg.train.seed` = 0) on the CPU, evaluates it on the
demo val split with the published protocol, and writes only the weights, as safetensors (no
pickle: loading it cannot run code), to `upernet_ref/assets/upernet_small_demo.safetensors` (package data).
It prints the file's SHA-256, which `upernet_ref.course.DEMO_CHECKPOINT_SHA256` pins: the
notebooks 08 and 09 load it with `course.load_demo_checkpoint` and assert mIoU >= 75%.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from upernet_ref.cli.demo import DEMO_CONFIG, DEMO_ITERS
from upernet_ref.configs import get_config
from upernet_ref.demo_scenes import DemoScenes
from upernet_ref.data.transforms import test_transform
from upernet_ref.evaluation.evaluate import evaluate
from upernet_ref.model.upernet import build_model
from upernet_ref.checkpoints import load_weights
from upernet_ref.cli.train import run_training
from upernet_ref.course import DEMO_CHECKPOINT

OUT = DEMO_CHECKPOINT  # upernet_ref/assets/, package data


def main() -> int:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = get_config(DEMO_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(cfg, out_dir=Path(tmp) / "run", device="cpu", max_iters=DEMO_ITERS,
                       progress=False, tensorboard=False, handle_signals=False)
        model = build_model(cfg)
        load_weights(model, result.last_checkpoint)
    model.eval()
    val = DemoScenes(cfg.data.val_split, transform=test_transform(cfg.data))
    metrics = evaluate(model, val, cfg, "cpu", progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp_out = OUT.with_suffix(".tmp")
    save_file(state, str(tmp_out), metadata={"config": cfg.name, "iterations": str(DEMO_ITERS),
                                             "seed": str(cfg.train.seed),
                                             "val_miou": f"{metrics['miou']:.4f}"})
    tmp_out.replace(OUT)
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    print(f"{OUT.name}: {OUT.stat().st_size / 1e6:.1f} MB, demo val mIoU "
          f"{100 * metrics['miou']:.1f}%, sha256 {digest}")
    return 0 if metrics["miou"] >= 0.75 else 1


if __name__ == "__main__":
    sys.exit(main())
