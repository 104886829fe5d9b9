"""`upernet predict`: segmentation maps for images, as index PNGs, colour PNGs and overlays.

The library side is `upernet_ref.predictions`.
"""
from __future__ import annotations
import argparse
import sys
from pathlib import Path
from upernet_ref.launch import resolve_device
from upernet_ref.cli.common import OVERRIDES_HELP, parse_args_and_overrides
from upernet_ref.cli.eval import add_inference_arguments, load_model
from upernet_ref.cli.common import check_writable_folder, command
from upernet_ref.data.images import IMAGE_SUFFIXES, read_image
from upernet_ref.errors import DataError, UsageError, before_work
from upernet_ref.predictions import (class_names_and_palette, describe_prediction,
                                            find_images, output_clashes, predict_image,
                                            save_prediction)


@command("upernet predict")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet predict", description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP)
    add_inference_arguments(parser)
    parser.add_argument("--out", default="predictions",
                        help="output folder (default: predictions) for NAME.png, NAME_color.png "
                             "and NAME_overlay.jpg; images found in a folder keep their path "
                             "inside it (pin/a/x.jpg -> OUT/a/x.png), images given as files go "
                             "to its top; inputs that would write the same file are refused")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, and folders searched recursively for images")
    args, args.overrides = parse_args_and_overrides(parser, argv)

    with before_work():
        out_dir = Path(args.out)
        missing = [item for item in args.inputs if not Path(item).exists()]
        if missing:
            raise UsageError(f"no such file or folder: {', '.join(missing)}")
        images = find_images(args.inputs)
        if not images:
            raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in "
                             f"{' '.join(args.inputs)}")
        clashes = output_clashes(images, out_dir)
        if clashes:
            lines = "".join(f"\n  {out} <- {', '.join(map(str, paths))}" for out, paths in clashes)
            raise UsageError(f"these inputs would write the same output file, so nothing was "
                             f"predicted:{lines}\nGive the folder that holds them instead (its "
                             f"sub-folders are kept under --out), rename them, or predict them "
                             f"into separate --out folders.")
        check_writable_folder(out_dir, "--out")
        device = resolve_device(args.device)
        model, cfg = load_model(args, device)
        classes, palette = class_names_and_palette(cfg)
    model.to(device).eval()
    failed = []
    for path, name in images:
        try:
            image = read_image(path)
        except DataError as error:  # reported, and the other images are still predicted
            print(f"upernet predict: error: {error}", file=sys.stderr)
            failed.append(path)
            continue
        labels = predict_image(model, image, cfg, device)
        written = save_prediction(labels, image, palette, out_dir, name, args.alpha)
        print(f"{path} -> {written[0]}  {describe_prediction(labels, classes)}")
    done = len(images) - len(failed)
    print(f"{done} of {len(images)} images predicted into {out_dir}")
    if failed:
        print(f"upernet predict: {len(failed)} image(s) could not be read: "
              f"{', '.join(str(p) for p in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
