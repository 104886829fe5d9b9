"""`upernet export`: export a model to ONNX, torch.export or a safetensors model folder
(Hugging Face layout, optionally pushed to the Hub), checked against PyTorch on the same input.

    upernet export --checkpoint runs/demo/last.pt --out demo.onnx
    upernet export --checkpoint runs/demo/last.pt --format safetensors --out hf \
        --eval-json eval.json --push-to-hub user/upernet-demo

The library side is `upernet_ref.perf.export`.
"""
from __future__ import annotations
import argparse
import json
import sys
import time
import torch
from pathlib import Path

from upernet_ref import hub
from upernet_ref.cli.common import (checkpoint_config, OVERRIDES_HELP, add_trust_checkpoint, check_writable_folder,
                                    command, parse_args_and_overrides, parse_pair, positive_int)
from upernet_ref.errors import UsageError, before_work
from upernet_ref import configs
from upernet_ref.data.info import class_names
from upernet_ref.model.upernet import build_model
from upernet_ref.perf.export import (export_onnx, export_torch)


def onnx_metadata(cfg: configs.Config) -> dict[str, str]:
    """What an ONNX runtime user needs beside the graph: class names and the normalisation."""
    return {"upernet_ref.config": cfg.name,
            "classes": json.dumps(list(class_names(cfg.data.dataset, cfg.model.num_classes,
                                                   cfg.data.classes))),
            "input": "images: (B, 3, H, W) float32 RGB, (pixel_0_255 - mean) / std",
            "mean": json.dumps(list(cfg.data.mean)), "std": json.dumps(list(cfg.data.std)),
            "output": "logits: (B, num_classes, H, W); argmax over dim 1 gives the class"}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="upernet export", description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--config", help="configuration name or file (default: the one stored in "
                        "--checkpoint; needed for published files and without a checkpoint)")
    parser.add_argument("--checkpoint", help="weights to load (default: random initialisation): "
                        "our checkpoint, a Hugging Face folder, a .safetensors file or a "
                        "published file")
    add_trust_checkpoint(parser)
    parser.add_argument("--format", choices=("onnx", "torch-export", "safetensors"),
                        default="onnx", help="ONNX file, torch.export program, or a Hugging "
                        "Face model folder: model.safetensors + config.json + README.md model "
                        "card, for eval/predict/train --weights/from_pretrained (default: onnx)")
    parser.add_argument("--eval-json", help="with --format safetensors: an `upernet eval` "
                        "results JSON whose metrics go into the model card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="with --format safetensors: "
                        "upload the folder to the Hugging Face Hub repository REPO (user/name, "
                        "created if needed; log in first with `hf auth login`)")
    parser.add_argument("--base-model", metavar="REPO", help="with --format safetensors: the "
                        "Hub id this model was fine-tuned from (base_model in the card)")
    parser.add_argument("--size", type=parse_pair, default=None,
                        help="input HxW the export is traced and checked at (default: the "
                             "config's crop size); torch-export keeps it, the ONNX graph takes "
                             "any batch and size (checked at a second size too)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="batch of the traced input (default: 1)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt2), or folder "
                        "(safetensors)")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    args, overrides = parse_args_and_overrides(parser, argv)
    for option in ("eval_json", "push_to_hub", "base_model"):
        if getattr(args, option) and args.format != "safetensors":
            parser.error(f"--{option.replace('_', '-')} is for --format safetensors (the model "
                         f"folder and its card)")
    return args, overrides


@command("upernet export")
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from upernet_ref.checkpoints import load_weights, read_checkpoint_file
    with before_work():
        metrics = hub.read_metrics(args.eval_json) if args.eval_json else None
        state = (read_checkpoint_file(args.checkpoint, trust=args.trust_checkpoint)
                 if args.checkpoint else None)
        cfg = configs.override(checkpoint_config(args.config, state, args.checkpoint), overrides)
        size = args.size or tuple(cfg.data.crop_size)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        if state is not None:
            load_weights(model, state, where=args.checkpoint)
        check_writable_folder(Path(args.out).parent, "--out")
    expected = {"onnx": ".onnx", "torch-export": ".pt2"}.get(args.format)
    if expected and not args.out.endswith(expected):
        print(f"upernet export: note: --format {args.format} writes {expected} files; "
              f"{args.out} keeps the name given", file=sys.stderr)
    start = time.perf_counter()
    try:
        if args.format == "onnx":
            report = export_onnx(model, size, args.out, args.batch, args.opset, not args.no_check,
                                 metadata=onnx_metadata(cfg))
        elif args.format == "safetensors":
            state = state or {}
            report = hub.export_safetensors(model, args.out, size, not args.no_check,
                                            metrics=metrics, iteration=state.get("iteration"),
                                            max_iters=state.get("max_iters"),
                                            base_model=args.base_model or state.get("base_model"))
            if args.push_to_hub:
                report["pushed"] = hub.upload_folder(args.out, args.push_to_hub)
        else:
            report = export_torch(model, size, args.out, args.batch, not args.no_check)
    except ValueError as err:  # a size the model cannot take: the argument is at fault
        raise UsageError(str(err)) from None
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"exported {cfg.name} at {args.batch}x3x{size[0]}x{size[1]} -> {report['path']}")
    for key, value in report.items():
        if key != "path":
            print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")
    agreement = [v for k, v in report.items() if k.endswith("argmax_agreement")]
    if agreement and min(agreement) < 0.999:
        print("upernet export: the exported model disagrees with PyTorch on more than 0.1% of "
              "pixels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
