"""`upernet eval`: mIoU of a checkpoint on a split, with the published protocol
(docs/SPEC.md, "Test protocol").

The library side is `upernet_ref.evaluation.evaluate`.
"""
from __future__ import annotations
import argparse
import json
import math
import sys
import typing
from pathlib import Path
import torch
from torch import nn
from upernet_ref import configs
from upernet_ref.configs import Config
from upernet_ref.launch import cleanup, init_distributed
from upernet_ref.cli.common import (checkpoint_config, OVERRIDES_HELP, add_trust_checkpoint, check_writable_folder,
                                    command, parse_args_and_overrides, parse_pair,
                                    parse_scales, positive_int, show_progress)
from upernet_ref.errors import UsageError, before_work
from upernet_ref.files import write_text
from upernet_ref.reports import format_table
from upernet_ref.collectives import rank_and_world
from upernet_ref.evaluation.evaluate import evaluate


# --------------------------------------------------------------------------------------------
# Command line


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by `upernet eval` and `upernet predict`."""
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, a Hugging Face "
                        "folder (upernet export --format safetensors), a .safetensors file, or a "
                        "published sssegmentation / mmsegmentation file (then --config is needed)")
    add_trust_checkpoint(parser)
    parser.add_argument("--config", help="configuration name or file (.json, .yaml; default: the "
                                          "one in the checkpoint)")
    shorthand = "shorthand for --test.{}=... (default: the config's)"
    parser.add_argument("--mode", choices=("whole", "slide"), help=shorthand.format("mode"))
    parser.add_argument("--crop", type=parse_pair,
                        help="sliding window HxW; " + shorthand.format("crop_size"))
    parser.add_argument("--stride", type=parse_pair,
                        help="sliding stride HxW; " + shorthand.format("stride"))
    parser.add_argument("--scales", type=parse_scales,
                        help="e.g. 0.5,0.75,1,1.25,1.5,1.75; " + shorthand.format("scales"))
    parser.add_argument("--flip", action="store_true", default=None,
                        help="add mirrored views; shorthand for --test.flip=true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--fast", action="store_true", help="the fast inference path: BatchNorm "
                        "folded, channels_last, bf16/fp16 where the device is fast at it, "
                        "torch.compile (on the CPU with freezing, for an input size only once "
                        "its uncompiled calls have cost about one compile) "
                        "(perf.fast.fast_inference_model)")


# the shorthands of `add_inference_arguments` and the `test.*` field each one sets
_SHORTHANDS = {"mode": "mode", "crop": "crop_size", "stride": "stride", "scales": "scales",
               "flip": "flip"}


def test_overrides(args: argparse.Namespace) -> list[str]:
    """`args.overrides` with the shorthands written out as the `test.*` overrides they are
    (`--stride 256x256` -> `test.stride=256x256`), so the test protocol is resolved once, by
    `configs.override`, into `cfg.test`. A shorthand and its own `--test.*` are refused
    together."""
    given = {item.split("=", 1)[0] for item in args.overrides}
    written = []
    for option, field in _SHORTHANDS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if f"test.{field}" in given:
            raise UsageError(f"--{option} and --test.{field} both given: use one")
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, tuple):
            text = ("x" if option in ("crop", "stride") else ",").join(f"{v:g}" for v in value)
        else:
            text = str(value)
        written.append(f"test.{field}={text}")
    return written + list(args.overrides)


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Config]:
    """Config (from --config or the checkpoint) and the model with the checkpoint's weights
    (the fast inference model for `device` with --fast)."""
    from upernet_ref.checkpoints import load_weights, read_checkpoint_file
    from upernet_ref.model.upernet import build_model

    path = Path(args.checkpoint)
    state = read_checkpoint_file(path, trust=args.trust_checkpoint)
    cfg = configs.override(checkpoint_config(args.config, state, str(path)), test_overrides(args))
    model = build_model(cfg)
    load_weights(model, state, where=str(path))
    if getattr(args, "fast", False):
        from upernet_ref.perf.fast import fast_inference_model
        model = fast_inference_model(model, device)
    return model, cfg


def protocol_tag(test: configs.TestConfig, fast: bool = False, limit: int | None = None) -> str:
    """A short name for an evaluation protocol, used in the default results file name.

    The mode (with its window when sliding: `slide_crop512x512_stride341x341`), the scales
    unless single-scale 1 (`s0.75-1`), `flip`, `fast` and `limit<N>` when used: `whole`,
    `slide_crop512x512_stride341x341_s0.5-0.75-1-1.25-1.5-1.75_flip_fast_limit100`; two
    protocols never share a name, so one results file never overwrites another's.
    """
    parts = [test.mode]
    if test.mode == "slide":
        parts += [f"crop{test.crop_size[0]}x{test.crop_size[1]}",
                  f"stride{test.stride[0]}x{test.stride[1]}"]
    if tuple(float(s) for s in test.scales) != (1.0,):
        parts.append("s" + "-".join(f"{s:g}" for s in test.scales))
    parts += ["flip"] * bool(test.flip) + ["fast"] * bool(fast)
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


@command("upernet eval")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet eval", description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    add_inference_arguments(parser)
    parser.add_argument("--data-root", help="dataset folder (not needed for the demo dataset)")
    parser.add_argument("--split", help="default: the config's validation split")
    parser.add_argument("--json", help="results file (default: next to the checkpoint, "
                        "<checkpoint stem>_eval_<split>_<protocol>.json, e.g. "
                        "last_eval_val_whole.json or last_eval_val_slide_crop512x512_stride341x341"
                        "_s0.75-1-1.25_flip_fast_limit50.json)")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--num-workers", type=int, help="data loader workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, args.overrides = parse_args_and_overrides(parser, argv)

    with before_work():
        info = init_distributed(args.device)  # joins torchrun's group: each rank takes a shard
    try:
        return _run(args, info.device)
    finally:
        cleanup(info)


def results_path(args: argparse.Namespace, cfg: Config, split: str) -> Path:
    """Where the JSON results go, checked writable before any work: `--json`, or next to the
    checkpoint (`<stem>_eval_<split>_<protocol>.json`), or in the current folder when the
    checkpoint's folder cannot be written."""
    if args.json:
        path = Path(args.json)
        check_writable_folder(path.parent, "--json")
        return path
    ckpt = Path(args.checkpoint)
    tag = protocol_tag(cfg.test, args.fast, args.limit)
    name = f"{ckpt.stem}_eval_{split}_{tag}.json"
    try:
        return check_writable_folder(ckpt.parent, "checkpoint folder") / name
    except UsageError:
        return check_writable_folder(Path.cwd(), "current folder (for the results file)") / name


def _bar(items: typing.Iterable, count: int) -> typing.Iterable:
    from tqdm import tqdm
    return tqdm(items, total=count, desc="eval", unit="img", leave=False)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    with before_work():
        model, cfg = load_model(args, device)
        from upernet_ref.data.transforms import test_transform
        from upernet_ref.sources import dataset_for
        split = args.split or cfg.data.val_split
        dataset = dataset_for(cfg, split, args.data_root, test_transform(cfg.data))
        rank, world = rank_and_world()
        json_path = results_path(args, cfg, split) if rank == 0 else None

    if rank == 0:
        count = (f"{len(dataset)} images" if not args.limit or args.limit >= len(dataset)
                 else f"the first {args.limit} of {len(dataset)} images")
        print(f"evaluating {cfg.name} from {args.checkpoint} on {cfg.data.dataset} {split!r} "
              f"({count}) on {device}" + (" (fast path)" if args.fast else "")
              + (f" and {world - 1} more process(es)" if world > 1 else ""))
    result = evaluate(model, dataset, cfg, device,
                      progress=_bar if show_progress(args.no_progress) else None,
                      num_workers=args.num_workers, limit=args.limit)
    if rank != 0:
        return 0
    classes = result.get("classes") or [str(i) for i in range(cfg.data.num_classes)]
    print(format_table(result, classes))
    print(f"protocol: {result['protocol']}")
    print(f"{result['num_images']} images in {result['seconds']:.1f} s")
    if getattr(model, "compiled_shapes", None) is not None:  # --fast: what compiling cost
        print(f"fast path: {model.settings.describe()}; {len(model.compiled_shapes)} input "
              f"shape(s) compiled in {model.compile_s:.1f} s (included above)")
    result.update(config=cfg.name, checkpoint=str(args.checkpoint), split=split,
                  dataset=cfg.data.dataset, fast=bool(args.fast))
    write_text(json_path, json.dumps(_jsonable(result), indent=2))
    print(f"results written to {json_path}")
    if result["skipped"]:
        where, problem = next(iter(result["skipped_samples"].items()))
        print(f"skipped {result['skipped']} bad sample(s) (data.on_bad=skip), left out of the "
              f"metrics and listed in {json_path}; first: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
