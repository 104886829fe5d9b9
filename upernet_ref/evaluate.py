"""`upernet eval`: mIoU of a checkpoint on a split, with the published protocol (spec section 4).

    upernet eval --config upernet_r50_os8_ade20k --checkpoint ckpt.pth --data-root data/ade
    upernet eval --checkpoint runs/demo/last.pt            # config stored in the checkpoint
    upernet eval ... --mode slide --scales 0.5,0.75,1,1.25,1.5,1.75 --flip

`evaluate(model, dataset, cfg, ...)` is the programmatic API (the trainer calls it for periodic
validation): every image is run through `inference.inference` at the test scale, its prediction
compared with the label at the original size, and one confusion matrix is accumulated on the
device over the whole split. With several processes (torchrun) each rank evaluates every
`world_size`-th image and the matrices are summed before the metrics are computed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import configs
from .configs import Config
from .distributed import cleanup, init_distributed
from .inference import inference
from .cli import parse_pair, parse_scales, positive_int
from .metrics import ConfusionMatrix, format_table


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _first(batch: list) -> typing.Any:  # DataLoader collate for batch_size=1, sizes vary
    return batch[0]


def describe_protocol(cfg: Config, mode: str, scales: tuple[float, ...], flip: bool,
                      crop_size: tuple[int, int], stride: tuple[int, int],
                      subset: tuple[int, int] | None = None) -> str:
    """One sentence saying how the numbers were obtained (printed and stored with them).

    `subset`: (images evaluated, images in the split) when only the first ones were.
    """
    long_side, short_side = cfg.data.base_scale
    how = ("whole-image inference" if mode == "whole"
           else f"sliding-window inference (crop {crop_size[0]}x{crop_size[1]}, "
                f"stride {stride[0]}x{stride[1]})")
    tta = ("single scale, no flip" if scales == (1.0,) and not flip
           else f"scales {', '.join(f'{s:g}' for s in scales)}{' + flip' if flip else ''}, "
                f"softmax averaged")
    return (f"{how} on the image fitted to {long_side}x{short_side} (aspect kept), {tta}; "
            f"logits resized to the label size, argmax; one confusion matrix over "
            f"{'the split' if subset is None else f'the first {subset[0]} of {subset[1]} images'}, "
            f"label {cfg.data.ignore_index} ignored; classes absent from prediction and label "
            f"left out of the mean")


def evaluate(model: nn.Module, dataset: typing.Any, cfg: Config,
             device: str | torch.device | None = None, mode: str | None = None,
             scales: typing.Sequence[float] | None = None, flip: bool | None = None,
             crop_size: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
             progress: bool = True, num_workers: int | None = None,
             limit: int | None = None) -> dict[str, typing.Any]:
    """mIoU / mAcc / aAcc (fractions) and per-class IoU / Acc of `model` over `dataset`.

    Args:
        dataset: items `(image, mask)`; `image` either normalised by `test_transform` or raw
            uint8 (then `test_transform(cfg.data)` is applied here); `mask` at the original size.
        cfg: the configuration (`cfg.test` gives the defaults of mode / scales / flip / crop /
            stride, `cfg.data` the ignore index and number of classes).
        device: where to run (default: the model's device).
        limit: evaluate only the first `limit` images (quick checks).

    Returns the `metrics.summarize` dict plus `protocol` (a sentence), `mode`, `scales`, `flip`,
    `num_images`, `seconds` and `classes` (when the dataset has them). The model's train/eval
    mode and device are restored afterwards.
    """
    mode = mode or cfg.test.mode
    scales = tuple(float(s) for s in (scales or cfg.test.scales))
    flip = cfg.test.flip if flip is None else flip
    crop_size = tuple(crop_size or cfg.test.crop_size)
    stride = tuple(stride or cfg.test.stride)
    param = next(model.parameters(), None)
    model_device = param.device if param is not None else torch.device("cpu")
    device = model_device if device is None else torch.device(device)
    model_was_training = model.training
    model.to(device).eval()

    rank, world = _world()
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    shard = torch.utils.data.Subset(dataset, range(rank, total, world))
    workers = cfg.data.num_workers if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False, num_workers=workers,
                                         collate_fn=_first)
    transform = None
    num_classes = cfg.data.num_classes
    cm = ConfusionMatrix(num_classes, cfg.data.ignore_index, device=device)
    start = time.perf_counter()
    items = loader
    if progress and rank == 0:
        from tqdm import tqdm
        items = tqdm(loader, total=len(shard), desc=f"eval ({mode})", unit="img", leave=False)
    try:
        for image, mask in items:
            if image.dtype == torch.uint8:  # a raw dataset: apply the published test pipeline
                if transform is None:
                    from .transforms import test_transform
                    transform = test_transform(cfg.data)
                image, mask = transform(image, mask)
            probs = inference(model, image.to(device), cfg.test, out_size=tuple(mask.shape[-2:]),
                              mode=mode, scales=scales, flip=flip, crop_size=crop_size,
                              stride=stride)
            cm.update(probs.argmax(1)[0], mask.to(device))
    finally:
        model.train(model_was_training).to(model_device)  # the caller's model as it was
    cm.reduce()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = cm.summary()
    result.update(
        protocol=describe_protocol(cfg, mode, scales, flip, crop_size, stride,
                                   None if total == len(dataset) else (total, len(dataset))),
        mode=mode, scales=list(scales), flip=bool(flip), crop_size=list(crop_size),
        stride=list(stride), num_images=total, seconds=time.perf_counter() - start,
    )
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        result["classes"] = list(classes)
    return result


# --------------------------------------------------------------------------------------------
# Command line


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by `upernet eval` and `upernet predict`."""
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, or a published "
                        "sssegmentation / mmsegmentation file (then --config is needed)")
    parser.add_argument("--config", help="configuration name (default: the one in the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. test.stride=256x256")
    parser.add_argument("--mode", choices=("whole", "slide"), help="default: the config's")
    parser.add_argument("--crop", type=parse_pair, help="sliding window HxW")
    parser.add_argument("--stride", type=parse_pair, help="sliding stride HxW")
    parser.add_argument("--scales", type=parse_scales, help="e.g. 0.5,0.75,1,1.25,1.5,1.75")
    parser.add_argument("--flip", action="store_true", default=None, help="add mirrored views")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--fast", action="store_true", help="the fast inference path: BatchNorm "
                        "folded, channels_last, bf16/fp16 where the device is fast at it "
                        "(fuse.fast_inference_model)")


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Config]:
    """Config (from --config or the checkpoint) and the model with the checkpoint's weights
    (the fast inference model for `device` with --fast)."""
    from .checkpoints import load_weights, read_checkpoint_file
    from .model import build_model

    path = Path(args.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = read_checkpoint_file(path)
    if args.config:
        cfg = configs.get_config(args.config)
    elif isinstance(state, dict) and isinstance(state.get("config"), dict):
        cfg = configs.from_dict(state["config"])
    else:
        raise ValueError(f"checkpoint {path} stores no configuration: pass --config NAME "
                         f"(one of {', '.join(configs.list_configs())})")
    cfg = configs.override(cfg, args.overrides)
    model = build_model(cfg)
    load_weights(model, state)
    if getattr(args, "fast", False):
        from .fuse import fast_inference_model
        model = fast_inference_model(model, device)
    return model, cfg


def protocol_tag(mode: str, scales: typing.Sequence[float], flip: bool, fast: bool = False,
                 limit: int | None = None) -> str:
    """A short name for an evaluation protocol, used in the default results file name.

    The mode, then the scales unless single-scale 1 (`s0.75-1`), `flip`, `fast` and
    `limit<N>` when used: `whole`, `slide_s0.5-0.75-1-1.25-1.5-1.75_flip_fast_limit100`.
    """
    parts = [mode]
    if tuple(float(s) for s in scales) != (1.0,):
        parts.append("s" + "-".join(f"{s:g}" for s in scales))
    parts += ["flip"] * bool(flip) + ["fast"] * bool(fast)
    if limit is not None:
        parts.append(f"limit{limit}")
    return "_".join(parts)


def _jsonable(x: typing.Any) -> typing.Any:
    if isinstance(x, float) and math.isnan(x):
        return None  # JSON has no NaN
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet eval", description=__doc__.split("\n")[0])
    add_inference_arguments(parser)
    parser.add_argument("--data-root", help="dataset folder (not needed for the demo dataset)")
    parser.add_argument("--split", help="default: the config's validation split")
    parser.add_argument("--json", help="results file (default: next to the checkpoint, "
                        "<checkpoint stem>_eval_<split>_<protocol>.json, e.g. "
                        "last_eval_val_whole.json or last_eval_val_slide_s0.75-1-1.25_flip_fast"
                        "_limit50.json)")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--num-workers", type=int, help="data loader workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        info = init_distributed(args.device)  # joins torchrun's group: each rank takes a shard
    except (ValueError, RuntimeError) as error:
        print(f"upernet eval: error: {error}", file=sys.stderr)
        return 2
    try:
        return _run(args, info.device)
    finally:
        cleanup(info)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    try:
        model, cfg = load_model(args, device)
        from .datasets import build_dataset
        from .transforms import test_transform
        split = args.split or cfg.data.val_split
        dataset = build_dataset(cfg, split, args.data_root, test_transform(cfg.data))
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"upernet eval: error: {error}", file=sys.stderr)
        return 2

    rank, world = _world()
    if rank == 0:
        count = (f"{len(dataset)} images" if not args.limit or args.limit >= len(dataset)
                 else f"the first {args.limit} of {len(dataset)} images")
        print(f"evaluating {cfg.name} from {args.checkpoint} on {cfg.data.dataset} {split!r} "
              f"({count}) on {device}" + (" (fast path)" if args.fast else "")
              + (f" and {world - 1} more process(es)" if world > 1 else ""))
    result = evaluate(model, dataset, cfg, device, mode=args.mode, scales=args.scales,
                      flip=args.flip, crop_size=args.crop, stride=args.stride,
                      progress=not args.no_progress, num_workers=args.num_workers,
                      limit=args.limit)
    if rank != 0:
        return 0
    classes = result.get("classes") or [str(i) for i in range(cfg.data.num_classes)]
    print(format_table(result, classes))
    print(f"protocol: {result['protocol']}")
    print(f"{result['num_images']} images in {result['seconds']:.1f} s")
    result.update(config=cfg.name, checkpoint=str(args.checkpoint), split=split,
                  dataset=cfg.data.dataset, fast=bool(args.fast))
    json_path = Path(args.json) if args.json else None
    if json_path is None:
        ckpt = Path(args.checkpoint)
        tag = protocol_tag(result["mode"], result["scales"], result["flip"], args.fast, args.limit)
        json_path = ckpt.with_name(f"{ckpt.stem}_eval_{split}_{tag}.json")
    text = json.dumps(_jsonable(result), indent=2)
    try:
        json_path.write_text(text)
    except OSError:
        if args.json:
            raise
        json_path = Path.cwd() / json_path.name  # checkpoint folder not writable
        json_path.write_text(text)
    print(f"results written to {json_path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
