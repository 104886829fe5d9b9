"""`upernet configs`: every configuration at a glance (the 12 published ones, then the small
ones for laptops and tests, marked), and one real forward pass.

Parameter counts and GMACs are computed from the models themselves, built on the `meta`
device (no memory, no compute), so the table doubles as a check against the spec's figures.
"""
from __future__ import annotations

import time

import torch

from upernet_ref.configs import REPORTED_PARAMS, get_config, list_configs
from upernet_ref.perf.flops import count_macs
from upernet_ref.model.layers import resize
from upernet_ref.model.upernet import build_model, count_parameters


def summary_rows(names: list[str] | None = None) -> list[dict]:
    """One dict per configuration (default: all of them): recipe, parameters, GMACs at the crop
    size (eval mode), and whether it is one of the small ones."""
    published = set(list_configs(published_only=True))
    rows = []
    for name in names or list_configs():
        cfg = get_config(name)
        with torch.device("meta"):
            model = build_model(cfg)
        rows.append({
            "name": name,
            "dataset": cfg.data.dataset,
            "classes": cfg.model.num_classes,
            "crop": cfg.data.crop_size,
            "batch": cfg.train.batch_size,
            "iters": cfg.train.max_iters,
            "params": count_parameters(model),
            "params_spec": REPORTED_PARAMS.get(cfg.model.depth, {}).get(cfg.data.dataset),
            "gmacs": count_macs(model.eval(), cfg.data.crop_size) / 1e9,
            "miou": cfg.reported_miou,
            "small": name not in published,
        })
    return rows


def format_summary(rows: list[dict]) -> str:
    head = (f"{'configuration':<30} {'classes':>7} {'crop':>9} {'batch':>5} {'iters':>7} "
            f"{'params':>12} {'= spec':>6} {'GMACs':>7} {'mIoU':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        same = "yes" if r["params"] == r["params_spec"] else ("-" if r["params_spec"] is None else "NO")
        crop = "x".join(map(str, r["crop"]))
        miou = f"{r['miou']:.2f}" if r["miou"] is not None else "-"
        name = r["name"] + (" *" if r.get("small") else "")
        gmacs = f"{r['gmacs']:.1f}" if r["gmacs"] >= 1 else f"{r['gmacs']:.3f}"
        lines.append(f"{name:<30} {r['classes']:>7} {crop:>9} {r['batch']:>5} {r['iters']:>7} "
                     f"{r['params']:>12,} {same:>6} {gmacs:>7} {miou:>6}")
    lines.append("GMACs: one forward pass at the crop size, eval mode (no auxiliary head); "
                 "mIoU: published single-scale val.")
    if any(r.get("small") for r in rows):
        lines.append("* small configuration for a laptop CPU, notebooks and tests (same "
                     "architecture and recipe shape, not a published one)")
    return "\n".join(lines)


def forward_once(name: str, image: torch.Tensor | None = None, size: tuple[int, int] | None = None,
                 device: str | None = None) -> dict:
    """One forward pass of configuration `name` (random weights) on an image; shapes and time.

    Args:
        image: uint8 (3, H, W) RGB; by default a demo scene at the configuration's crop size.
        size: resize the image to this (H, W) first.
    """
    from upernet_ref.launch import resolve_device
    from upernet_ref.data.transforms import test_transform  # the data side is imported only when used

    cfg = get_config(name)
    device = resolve_device(device)  # None / "auto": CUDA when there is one
    if image is None:
        from upernet_ref.demo_scenes import DemoScenes
        image, _ = DemoScenes("val", num_samples=1, size=size or cfg.data.crop_size)[0]
    x, _ = test_transform(cfg.data)(image, torch.zeros(image.shape[-2:], dtype=torch.int64))
    if size is not None:
        x = resize(x[None], size)[0]
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(device)
    batch = x[None].to(device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(batch)["out"]
    seconds = time.perf_counter() - start
    return {"name": name, "input": tuple(batch.shape), "logits": tuple(logits.shape),
            "prediction_classes": int(logits.argmax(1).unique().numel()), "seconds": seconds,
            "device": str(device)}
