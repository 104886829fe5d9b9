"""`upernet demo` (`make demo`): the whole pipeline on the embedded demo scenes, on a CPU.

1. prints the 12 published configurations (parameters, GMACs, reported mIoU) and how to train
   and evaluate each of them;
2. trains `upernet_small_demo` (a width-16 dilated ResNet-18 UPerNet, os8, same recipe: SGD,
   poly lr, CE + 0.4 x aux CE, the published train pipeline at a 64x64 crop) on the procedural
   `synthetic.DemoScenes` for a few minutes;
3. evaluates it on the demo val split (whole-image, single scale, the published protocol) and
   prints the per-class IoU table against the chance level;
4. writes `curves.png` (loss, lr, val mIoU) and `predictions.png` (image | ground truth |
   prediction) to the output folder (default `outputs/demo`), with the checkpoint and logs in
   `outputs/demo/run/`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from upernet_ref import configs
from upernet_ref.cli.common import check_writable_folder, command, positive_int, show_progress
from upernet_ref.errors import before_work

DEMO_CONFIG = "upernet_small_demo"
DEMO_ITERS = 900  # 3x the recipe's 300: about a minute on 2 CPU cores, mIoU ~78% instead of ~66%
FORWARD_CONFIG = "upernet_r50_os8_ade20k"  # the published model shown running on one image


def how_to_run() -> str:
    """The commands that train and evaluate the published configurations."""
    names = configs.list_configs(published_only=True)
    return "\n".join([
        "To train a published configuration (names above; data preparation: upernet data --help):",
        "  1 GPU:     upernet train --config upernet_r50_os8_ade20k --data-root data/ADEChallengeData2016",
        "  8 GPUs:    torchrun --nproc_per_node=8 -m upernet_ref.cli train "
        "--config upernet_r50_os8_ade20k --data-root ...",
        "  N nodes:   torchrun --nnodes=N --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\",
        "               --rdzv-id=upernet -m upernet_ref.cli train --config ... --data-root ...",
        "  The global batch (16; 8 for Cityscapes) is kept on any hardware by gradient accumulation;",
        "  continue an interrupted run with --resume; evaluate with",
        "  upernet eval --config NAME --checkpoint runs/NAME/last.pt --data-root ...",
        f"  configurations: {', '.join(names)}",
    ])


def chance_miou(dataset, num_classes: int, seed: int = 0) -> float:
    """mIoU of uniformly random predictions on `dataset` (raw items): the level to beat."""
    from upernet_ref.evaluation.metrics import confusion_matrix, summarize

    g = torch.Generator().manual_seed(seed)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(len(dataset)):
        _, mask = dataset[i]
        pred = torch.randint(0, num_classes, mask.shape, generator=g)
        matrix += confusion_matrix(pred, mask, num_classes)
    return float(summarize(matrix)["miou"])


def prediction_figure(model: torch.nn.Module, dataset, cfg: configs.Config, count: int = 4,
                      device: str | torch.device = "cpu"):
    """A matplotlib grid of `count` raw items: image | ground truth | prediction (palette colours)."""
    import matplotlib.pyplot as plt

    from upernet_ref.evaluation.inference import predict_labels
    from upernet_ref.data.transforms import colorize, test_transform

    transform = test_transform(cfg.data)
    model.eval()
    fig, axes = plt.subplots(count, 3, figsize=(7.5, 2.1 * count), squeeze=False)
    for row in range(count):
        image, mask = dataset[row]
        x, _ = transform(image, mask)
        with torch.no_grad():
            pred = predict_labels(model, x[None].to(device), cfg.test, out_size=tuple(mask.shape))[0]
        panels = (image, colorize(mask, dataset.palette), colorize(pred.cpu(), dataset.palette))
        for col, (title, panel) in enumerate(zip(("image", "ground truth", "prediction"), panels)):
            ax = axes[row][col]
            ax.imshow(panel.permute(1, 2, 0).numpy())
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    names = ", ".join(f"{n}" for n in dataset.classes)
    fig.suptitle(f"{cfg.name} on DemoScenes val (white = ignore)\nclasses: {names}", fontsize=8)
    fig.tight_layout()
    return fig


def save_predictions(model: torch.nn.Module, dataset, cfg: configs.Config, path: Path,
                     count: int = 4, device: str | torch.device = "cpu") -> Path:
    """`prediction_figure` written to `path` (PNG)."""
    from functools import partial

    import matplotlib.pyplot as plt

    from upernet_ref.files import atomic_write
    fig = prediction_figure(model, dataset, cfg, count, device)
    atomic_write(path, partial(fig.savefig, dpi=100, format="png"))
    plt.close(fig)
    return path


@command("upernet demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--max-iters", type=positive_int, default=DEMO_ITERS,
                        help=f"training iterations (default {DEMO_ITERS})")
    parser.add_argument("--forward", default=FORWARD_CONFIG, metavar="NAME",
                        help=f"published configuration to run once on an image (default "
                             f"{FORWARD_CONFIG}; 'none' to skip)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--no-summary", action="store_true", help="skip the configurations table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.forward != "none" and not args.no_summary:
        try:
            configs.get_config(args.forward)
        except KeyError as err:
            parser.error(str(err))
    with before_work():
        check_writable_folder(args.out, "--out")

    from upernet_ref.evaluation.evaluate import evaluate
    from upernet_ref.reports import format_table
    from upernet_ref.demo_scenes import DemoScenes
    from upernet_ref.cli.train import run_training

    start = time.perf_counter()
    if not args.no_summary:
        print("The 12 published UPerNet configurations, then the small ones (parameters and "
              "GMACs computed from the models):\n")
        from upernet_ref.cli.configs import print_summary
        from upernet_ref.perf.configs_table import forward_once
        print_summary()
        print()
        print(how_to_run())
        print()
        if args.forward != "none":
            fwd_cfg = configs.get_config(args.forward)
            r = forward_once(args.forward, size=fwd_cfg.data.crop_size,
                             device=args.device)
            print(f"One forward pass of {r['name']} (random weights) on a demo scene resized to "
                  f"{fwd_cfg.data.crop_size[0]}x{fwd_cfg.data.crop_size[1]}: input {r['input']} -> "
                  f"logits {r['logits']} on {r['device']} in {r['seconds']:.1f} s\n")

    cfg = configs.get_config(DEMO_CONFIG)
    out = Path(args.out)
    run_dir = out / "run"
    if run_dir.exists():  # the demo always starts from scratch
        shutil.rmtree(run_dir)
    print(f"Training {cfg.name} on the embedded demo scenes ({len(DemoScenes('train'))} train "
          f"images, {cfg.data.num_classes} classes), {args.max_iters or cfg.train.max_iters} iterations:")
    result = run_training(cfg, out_dir=run_dir, device=args.device, max_iters=args.max_iters,
                          progress=show_progress(args.no_progress))
    if result.interrupted:
        return 130

    from upernet_ref.checkpoints import load_weights
    from upernet_ref.launch import resolve_device
    from upernet_ref.model.upernet import build_model
    from upernet_ref.data.transforms import test_transform

    model = build_model(cfg)
    load_weights(model, result.last_checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    val = DemoScenes(cfg.data.val_split)  # raw, for the pictures and the chance level
    metrics = evaluate(model, DemoScenes(cfg.data.val_split, transform=test_transform(cfg.data)),
                       cfg, device, progress=None)
    chance = chance_miou(val, cfg.data.num_classes)
    print(f"\nDemo val split ({metrics['num_images']} images): {metrics['protocol']}\n")
    print(format_table(metrics, val.classes))
    print(f"\nmIoU {100 * metrics['miou']:.1f}% vs {100 * chance:.1f}% for random labels")

    out.mkdir(parents=True, exist_ok=True)
    curves = out / "curves.png"
    shutil.copyfile(run_dir / "curves.png", curves)
    predictions = save_predictions(model, val, cfg, out / "predictions.png", device=device)
    print(f"\nwrote {curves}, {predictions}; checkpoint and logs in {run_dir}/ "
          f"({time.perf_counter() - start:.0f} s in all)")
    if metrics["miou"] < 2 * chance:
        print("warning: the demo model is not clearly above chance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
