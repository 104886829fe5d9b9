"""`upernet data`: describe, prepare and check the benchmark datasets before a long training run.

    upernet data list                 each dataset's description (upernet_ref/data/info.py)
    upernet data prepare voc-aug --voc-root VOCdevkit/VOC2012 --sbd-root benchmark_RELEASE/dataset
    upernet data prepare cityscapes --root cityscapes [--overwrite]
    upernet data check --dataset ade20k --root ADEChallengeData2016 [--split validation]

`prepare` keeps output files that already exist (and says how many) unless `--overwrite`.
`check` prints one line per problem (the file and what is wrong), a summary per split, and
exits with 1 when anything is wrong (0 when clean). See data/README.md for the layouts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from upernet_ref.cli.common import command, show_progress
from upernet_ref.data.datasets import DataError, describe_values, open_dataset
from upernet_ref.data.info import DATASETS

ON_DISK = [name for name in DATASETS if name != "demo"]  # the generated scenes have no files


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="upernet data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="describe every dataset: classes, splits, layout, licence",
                   description="Print each dataset's description (upernet_ref/data/info.py): "
                               "classes, splits, folder layout, terms of use, preparation and "
                               "Hugging Face Hub id.")
    prepare = sub.add_parser(
        "prepare", help="convert SBD (voc-aug) or write Cityscapes train ids",
        description="Write the derived label files a dataset needs before training: the VOC "
                    "trainaug split from SBD, or the Cityscapes train-id PNGs.")
    which = prepare.add_subparsers(dest="target", required=True)
    voc = which.add_parser(
        "voc-aug", help="SBD .mat -> SegmentationClassAug + trainaug.txt",
        description="Convert the SBD .mat labels to PNGs in VOC2012/SegmentationClassAug (VOC's "
                    "own labels where it has them) and write ImageSets/Segmentation/trainaug.txt "
                    "(SBD + VOC train, minus VOC val). Files that already exist are kept "
                    "unless --overwrite.")
    voc.add_argument("--voc-root", type=Path, required=True, help="VOCdevkit/VOC2012")
    voc.add_argument("--sbd-root", type=Path, required=True, help="benchmark_RELEASE/dataset")
    voc.add_argument("--overwrite", action="store_true",
                     help="rewrite label PNGs and trainaug.txt that already exist (default: "
                          "keep them and report how many)")
    city = which.add_parser(
        "cityscapes", help="write *_gtFine_labelTrainIds.png",
        description="Write gtFine/*/*/*_gtFine_labelTrainIds.png (19 train ids, 255 ignored) "
                    "next to every *_gtFine_labelIds.png. Files that already exist (e.g. from "
                    "cityscapesscripts, which differ at boundary pixels) are kept unless "
                    "--overwrite.")
    city.add_argument("--root", type=Path, required=True, help="folder holding gtFine/")
    city.add_argument("--overwrite", action="store_true",
                      help="rewrite train-id files that already exist, e.g. cityscapesscripts' "
                           "(default: keep them and report how many)")
    check = sub.add_parser(
        "check", help="report missing, truncated, mismatched or mislabelled files",
        description="Check a dataset before a long training run: every image / label pair of "
                    "each split (all splits unless --split) for missing, truncated or unreadable "
                    "files, a label size that differs from the image's, and label values outside "
                    "the dataset's valid set. Prints one line per problem and a summary per "
                    "split; exit status 1 when anything is wrong, 0 when clean.")
    check.add_argument("--dataset", required=True,
                       choices=(*ON_DISK, "folder"),
                       help="dataset layout (see data/README.md)")
    check.add_argument("--root", type=Path, required=True, help="dataset folder")
    check.add_argument("--split", action="append", help="split to check (repeatable; default: all)")
    check.add_argument("--num-classes", type=int, help="folder dataset without classes.txt")
    check.add_argument("--decode-images", action="store_true",
                       help="fully decode every image too (slower; finds corruption mid-file)")
    for p in (voc, city, check):
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="processes (default: min(8, CPU count))")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def default_splits(dataset: str, root: Path) -> list[str]:
    """The splits to check when none is named; trainaug only once it is prepared."""
    if dataset == "folder":
        images = root / "images"
        return sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    splits = [s for s in DATASETS[dataset].splits if s not in ("trainval", "test")]
    if dataset == "voc":
        voc = root / "VOCdevkit" / "VOC2012" if (root / "VOCdevkit").is_dir() else root
        if not (voc / "ImageSets" / "Segmentation" / "trainaug.txt").exists():
            splits.remove("trainaug")
    return splits


def check(args: argparse.Namespace) -> int:
    """Check every requested split; 1 if anything is wrong."""
    from upernet_ref.prepare import check_dataset
    splits = args.split or default_splits(args.dataset, args.root)
    if not splits:
        print(f"{args.root}: no splits found (see data/README.md)")
        return 1
    bad = 0
    for split in splits:
        try:
            dataset = open_dataset(args.dataset, args.root, split, num_classes=args.num_classes)
        except (DataError, FileNotFoundError, ValueError) as e:
            print(f"[{split}] empty split: {e}" if isinstance(e, DataError) else f"[{split}] {e}")
            bad += 1
            continue
        problems, histogram = check_dataset(dataset, args.workers, args.decode_images,
                                            show_progress(args.no_progress), desc=f"{args.dataset} {split}")
        for kind, message in problems:
            print(f"[{split}] {kind}: {message}")
        kinds: dict[str, int] = {}
        for kind, _ in problems:
            kinds[kind] = kinds.get(kind, 0) + 1
        found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no problems"
        total = max(int(histogram.sum()), 1)
        print(f"{args.dataset} {split}: {len(dataset)} pairs, {found}; raw label values "
              f"{describe_values(histogram.nonzero()[0]) or '-'}, "
              f"{100 * histogram[255] / total:.2f}% of pixels 255")
        bad += len(problems)
    print("OK: no problems found" if bad == 0 else f"FAILED: {bad} problem(s) found")
    return 0 if bad == 0 else 1


def report(written: int, what: str, skipped: int) -> str:
    """`wrote N <what>`, and how many existing files were kept."""
    kept = f"; skipped {skipped} that already exist (--overwrite regenerates them)"
    return f"wrote {written} {what}{kept if skipped else ''}"


def prepare(args: argparse.Namespace) -> int:
    """Run `prepare voc-aug` or `prepare cityscapes`; 1 with a one-line error on failure."""
    from upernet_ref.prepare import prepare_cityscapes, prepare_voc_aug
    try:
        if args.target == "voc-aug":
            ids, done = prepare_voc_aug(args.voc_root, args.sbd_root, args.workers,
                                        show_progress(args.no_progress), args.overwrite)
            trainaug = args.voc_root / "ImageSets" / "Segmentation" / "trainaug.txt"
            labels = [p for p in done.written if p != trainaug]
            print(report(len(labels), f"label PNGs to {args.voc_root / 'SegmentationClassAug'}",
                         len([p for p in done.skipped if p != trainaug])))
            if trainaug in done.written:
                print(f"wrote {trainaug}: {len(ids)} ids (10,582 on the full VOC 2012 + SBD)")
            else:
                kept = trainaug.read_text().split()
                same = ("the same ids as computed" if sorted(kept) == ids else
                        f"the computed list has {len(ids)} ids (--overwrite replaces it)")
                print(f"kept the existing {trainaug}: {len(kept)} ids; {same}")
        else:
            done = prepare_cityscapes(args.root, args.workers, show_progress(args.no_progress),
                                      args.overwrite)
            print(report(len(done.written), f"*_gtFine_labelTrainIds.png files under "
                         f"{args.root / 'gtFine'}", len(done.skipped)))
    except (DataError, OSError) as e:  # FileNotFoundError, PermissionError, ...: no traceback
        print(f"upernet data prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


def describe() -> int:
    """`upernet data list`: one block per dataset description."""
    for info in DATASETS.values():
        print(f"{info.name}: {info.title}, {len(info.classes)} classes "
              f"({', '.join(info.classes[:5])}, ...)\n  splits: {', '.join(info.splits)}\n"
              f"  layout: {info.layout}\n  licence: {info.licence}\n  prepare: {info.prepare}"
              + (f"\n  Hugging Face Hub: {info.hub_id}" if info.hub_id else ""))
    print("folder: your own images/<split>/, masks/<split>/, classes.txt (data/README.md)\n"
          "hf: a datasets.save_to_disk folder or a Hub dataset id (--data.hf_* options)")
    return 0


@command("upernet data")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.action == "list":
        return describe()
    return check(args) if args.action == "check" else prepare(args)
