"""Accuracy and speed of fast-path variants vs fp32 eager (issue 6; results in docs/benchmarks.md).

    python benchmarks/fast_path_options.py agreement --r50 --json agreement.json
    python benchmarks/fast_path_options.py speed --repeats 5 --json speed.json

Variants: bf16 autocast + BN folding + channels_last (`fuse.fast_inference_model`) with some
submodules kept in float32 (`float32_modules`), and the all-float32 folded model.

`agreement`: argmax agreement with fp32 eager (overall, and the fraction of near-ties) for
(a) `upernet_small_demo` with seeded random weights and populated BN statistics on real images,
(b) the same config trained briefly on the demo data, on demo val (plus its mIoU) and on real
images, (c) `upernet_r50_os8_ade20k` with seeded random weights and BN statistics on real images.
`speed`: R-50 os8 512x512 batch 1 latency (wall and process CPU time) of eager and each variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from upernet_ref import build_model, configs
from upernet_ref.perf.fast import fast_inference_model
from upernet_ref.demo_scenes import DemoScenes
from upernet_ref.data.transforms import test_transform

SHARED = Path(os.environ.get("UPERNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REALDATA = SHARED / "realdata"
ONLY: list[str] = []  # --variants: restrict to these variant names

CHEAP = ("backbone.stem", "backbone.layer1", "backbone.layer2", "decode_head.lateral_convs",
         "decode_head.ppm.branches", "decode_head.classifier")
VARIANTS: dict[str, dict] = {
    "bf16 (all)": dict(dtype=torch.bfloat16, float32_modules=()),
    "bf16, fp32 classifier": dict(dtype=torch.bfloat16,
                                  float32_modules=("decode_head.classifier",)),
    "bf16, fp32 cheap layers (stem, layer1-2, laterals, PPM branches, classifier)":
        dict(dtype=torch.bfloat16, float32_modules=CHEAP),
    "bf16, fp32 fuse + classifier": dict(dtype=torch.bfloat16,
                                         float32_modules=("decode_head.fuse",
                                                          "decode_head.classifier")),
    "bf16 backbone only (decode head fp32)": dict(dtype=torch.bfloat16,
                                                  float32_modules=("decode_head",)),
    "bf16 decode head only (backbone fp32)": dict(dtype=torch.bfloat16,
                                                  float32_modules=("backbone",)),
    "bf16, fp32 stem": dict(dtype=torch.bfloat16, float32_modules=("backbone.stem",)),
    "bf16, fp32 stem + classifier": dict(dtype=torch.bfloat16,
                                         float32_modules=("backbone.stem",
                                                          "decode_head.classifier")),
    "bf16, fp32 stem + layer1 + classifier": dict(dtype=torch.bfloat16,
                                                  float32_modules=("backbone.stem",
                                                                   "backbone.layer1",
                                                                   "decode_head.classifier")),
    "bf16, fp32 stem + layer1-2 + classifier": dict(
        dtype=torch.bfloat16, float32_modules=("backbone.stem", "backbone.layer1",
                                               "backbone.layer2", "decode_head.classifier")),
    "bf16, fp32 stem + layer1-3 + classifier": dict(
        dtype=torch.bfloat16, float32_modules=("backbone.stem", "backbone.layer1",
                                               "backbone.layer2", "backbone.layer3",
                                               "decode_head.classifier")),
    "bf16, fp32 laterals + PPM branches + classifier": dict(
        dtype=torch.bfloat16, float32_modules=("decode_head.lateral_convs",
                                               "decode_head.ppm.branches",
                                               "decode_head.classifier")),
    "fp32 (BN folded)": dict(dtype=None, float32_modules=()),
}


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(configs.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(configs.IMAGENET_STD).view(1, 3, 1, 1)
    return (images_uint8.float() - mean) / std


def real_images(size: tuple[int, int], per_dataset: int) -> tuple[torch.Tensor, list[str]]:
    """ADE20K val/train, VOC val and Cityscapes images from shared/realdata, resized to `size`."""
    voc = REALDATA / "voc/VOCdevkit/VOC2012"
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[:per_dataset]
    paths = (sorted((REALDATA / "ade20k/ADEChallengeData2016/images").rglob("*.jpg"))[:per_dataset]
             + [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
             + sorted((REALDATA / "cityscapes/leftImg8bit").rglob("*.png"))[:per_dataset])
    arrays = [np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.BILINEAR))
              for p in paths]
    images = normalize(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    return images, [p.name for p in paths]


def random_model_with_bn_stats(name: str, size: tuple[int, int]) -> nn.Module:
    """Seeded random weights, random BN affine, BN statistics from 3 train-mode forwards."""
    torch.manual_seed(0)
    net = build_model(name)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.momentum = 0.5
    net.train()
    scenes = DemoScenes("train", num_samples=4, size=size, seed=1)
    batch = normalize(torch.stack([scenes[i][0] for i in range(4)]))
    with torch.no_grad():
        for _ in range(3):
            net(batch)
    return net.eval()


def agreement(eager_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    top2 = eager_logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    same = eager_logits.argmax(1) == logits.argmax(1)
    std = eager_logits.std()
    return {"agreement": same.float().mean().item(),
            "near_tie_fraction": (margin < 0.05 * std).float().mean().item(),
            "max_abs_diff_over_std": ((eager_logits - logits).abs().max() / std).item(),
            "mean_abs_diff_over_std": ((eager_logits - logits).abs().mean() / std).item()}


def compare(model: nn.Module, images: torch.Tensor, variants: dict[str, dict],
            batch: int = 4) -> dict[str, dict]:
    variants = {k: v for k, v in variants.items() if not ONLY or k in ONLY}
    def run(net):
        with torch.no_grad():
            return torch.cat([net(images[i:i + batch])["out"]
                              for i in range(0, len(images), batch)])
    eager = run(model)
    out = {}
    for name, kwargs in variants.items():
        out[name] = agreement(eager, run(fast_inference_model(model, "cpu", compile=False,
                                                              **kwargs)))
        print(f"  {name:80s} {out[name]['agreement']:.5f} "
              f"(near-ties {out[name]['near_tie_fraction']:.4f}, "
              f"max|d|/std {out[name]['max_abs_diff_over_std']:.4f})", flush=True)
    return out


def run_agreement(args: argparse.Namespace) -> dict:
    result: dict = {"load_average_1min_start": os.getloadavg()[0]}
    small_images, names = real_images((192, 256), per_dataset=4)
    result["real_images_small"] = names
    if not args.skip_random:
        print("(a) upernet_small_demo, seeded random weights, real images 192x256", flush=True)
        net = random_model_with_bn_stats("upernet_small_demo", (64, 64))
        result["small_demo_random_real"] = compare(net, small_images, VARIANTS)

    if args.no_train:
        return run_r50(args, result)
    cfg = configs.override(configs.get_config("upernet_small_demo"),
                           {"train.val_interval": 0, "train.checkpoint_interval": 100000,
                            "train.seed": args.seed})
    from upernet_ref.checkpoints import load_weights
    from upernet_ref.evaluation.evaluate import evaluate
    from upernet_ref.cli.train import run_training
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = run_training(cfg, out_dir=tmp, max_iters=args.iters, validate=False, progress=False,
                        tensorboard=False, handle_signals=False, log=lambda *_: None)
        net = load_weights(build_model(cfg), trained.last_checkpoint).eval()
    result["train_iters"], result["train_s"] = args.iters, time.perf_counter() - t0
    val = DemoScenes("val", num_samples=args.val_samples, size=tuple(cfg.data.base_scale[::-1]),
                     seed=0)
    val_images = normalize(torch.stack([val[i][0] for i in range(len(val))]))
    print(f"(b) upernet_small_demo trained {args.iters} iterations, demo val", flush=True)
    result["small_demo_trained_val"] = compare(net, val_images, VARIANTS)
    print("    mIoU (whole-image evaluation of demo val)", flush=True)
    val = DemoScenes("val", num_samples=args.val_samples, size=tuple(cfg.data.base_scale[::-1]),
                     seed=0, transform=test_transform(cfg.data))  # the form evaluate takes
    mious = {"eager fp32": evaluate(net, val, cfg, device="cpu", progress=False,
                                    num_workers=0)["miou"]}
    for name, kwargs in VARIANTS.items():
        if ONLY and name not in ONLY:
            continue
        fast = fast_inference_model(net, "cpu", compile=False, **kwargs)
        mious[name] = evaluate(fast, val, cfg, device="cpu", progress=False,
                               num_workers=0)["miou"]
        print(f"  {name:80s} {100 * mious[name]:.3f} (eager {100 * mious['eager fp32']:.3f})",
              flush=True)
    result["small_demo_trained_miou"] = mious
    print("(b') the same trained model on real images 192x256", flush=True)
    result["small_demo_trained_real"] = compare(net, small_images, VARIANTS)

    return run_r50(args, result)


def run_r50(args: argparse.Namespace, result: dict) -> dict:
    if args.r50:
        r50_images, names = real_images((256, 256), per_dataset=2)
        result["real_images_r50"] = names
        print("(c) upernet_r50_os8_ade20k, seeded random weights, real images 256x256", flush=True)
        net = random_model_with_bn_stats("upernet_r50_os8_ade20k", (96, 96))
        result["r50_random_real"] = compare(net, r50_images,
                                            VARIANTS, batch=2)
    result["load_average_1min_end"] = os.getloadavg()[0]
    return result


def run_speed(args: argparse.Namespace) -> dict:
    """Interleaved rounds (eager, variant 1, variant 2, ...) so that a change in the load of the
    shared machine hits every path alike; median wall and process CPU time per path."""
    torch.manual_seed(0)
    model = build_model("upernet_r50_os8_ade20k").eval()
    images = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    paths = {"eager fp32": model}
    for name in ONLY or VARIANTS:
        paths[name] = fast_inference_model(model, "cpu", compile=False, **VARIANTS[name])
    walls: dict[str, list[float]] = {name: [] for name in paths}
    cpus: dict[str, list[float]] = {name: [] for name in paths}
    loads = [os.getloadavg()[0]]
    with torch.no_grad():
        for net in paths.values():
            net(images)  # warmup 1
        for _ in range(args.repeats):
            for name, net in paths.items():
                w, c = time.perf_counter(), time.process_time()
                net(images)
                walls[name].append(time.perf_counter() - w)
                cpus[name].append(time.process_time() - c)
            loads.append(os.getloadavg()[0])
    result: dict = {"threads": torch.get_num_threads(), "repeats": args.repeats,
                    "load_average_1min": loads}
    for name in paths:
        result[name] = {"wall_ms": 1000 * statistics.median(walls[name]),
                        "cpu_ms": 1000 * statistics.median(cpus[name]),
                        "runs_ms": [1000 * w for w in walls[name]],
                        "cpu_runs_ms": [1000 * c for c in cpus[name]]}
        result[name]["speedup_wall"] = result["eager fp32"]["wall_ms"] / result[name]["wall_ms"]
        result[name]["speedup_cpu"] = result["eager fp32"]["cpu_ms"] / result[name]["cpu_ms"]
        r = result[name]
        print(f"{name:80s} wall {r['wall_ms']:8.0f} ms ({r['speedup_wall']:.2f}x)"
              f"  cpu {r['cpu_ms']:8.0f} ms ({r['speedup_cpu']:.2f}x)", flush=True)
    print(f"load average (1 min) per round: {[round(x, 2) for x in loads]}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("agreement", "speed"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--iters", type=int, default=600, help="demo training iterations")
    parser.add_argument("--seed", type=int, default=0, help="demo training seed (train.seed)")
    parser.add_argument("--val-samples", type=int, default=16)
    parser.add_argument("--r50", action="store_true", help="also (c), R-50 agreement")
    parser.add_argument("--skip-random", action="store_true", help="skip (a)")
    parser.add_argument("--no-train", action="store_true", help="skip (b)")
    parser.add_argument("--variants", nargs="*", default=[], help="only these variant names")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    ONLY[:] = args.variants
    if not REALDATA.is_dir() and args.what == "agreement":
        sys.exit(f"{REALDATA} is absent: the agreement figures need the real images")
    result = run_agreement(args) if args.what == "agreement" else run_speed(args)
    result["torch"] = torch.__version__
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
