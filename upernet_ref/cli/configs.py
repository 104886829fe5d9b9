"""`upernet configs`: list the 12 published configurations with their parameters, GMACs and
reported mIoU, or write one as a configuration file.

    upernet configs
    upernet configs --forward upernet_r50_os8_ade20k --size 512x512
    upernet configs --dump upernet_r50_os8_ade20k --train.lr=0.02 --out my.yaml
    upernet train --config my.yaml            # any command's --config takes the file

The library side is `upernet_ref.perf.configs_table`.
"""
from __future__ import annotations
import argparse
import json
import sys
from pathlib import Path

from upernet_ref import configs
from upernet_ref.cli.common import (OVERRIDES_HELP, check_writable_folder, command,
                                    parse_args_and_overrides, parse_pair)
from upernet_ref.config_files import load_config, write_config_file
from upernet_ref.configs import get_config
from upernet_ref.errors import before_work
from upernet_ref.perf.configs_table import forward_once, format_summary, summary_rows


def print_summary() -> None:
    """The configurations table (`upernet configs`, `upernet demo`), on stdout."""
    print(format_summary(summary_rows()))


@command("upernet configs")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet configs", description=__doc__.split("\n\n")[0],
                                     epilog=OVERRIDES_HELP + " With --dump they change the "
                                     "configuration written.")
    parser.add_argument("--dump", metavar="NAME_OR_FILE",
                        help="write this configuration (a name or a configuration file, with "
                             "the overrides applied) as a whole configuration file instead of "
                             "the table: to --out (.json, .yaml), or JSON on stdout")
    parser.add_argument("--out", help="with --dump: the file to write (.json, .yaml or .yml)")
    parser.add_argument("--forward", metavar="NAME", help="also run one forward pass of NAME")
    parser.add_argument("--size", type=parse_pair, default=(512, 512),
                        help="forward-pass input size HxW")
    parser.add_argument("--device", default=None,
                        help="device of the forward pass (default: cuda if available)")
    args, overrides = parse_args_and_overrides(parser, argv)
    if (args.out or overrides) and not args.dump:
        parser.error("--out and --section.field=value overrides go with --dump NAME")
    if args.dump:
        with before_work():
            cfg = load_config(args.dump, overrides)
            if args.out:
                check_writable_folder(Path(args.out).parent, "--out")
                write_config_file(cfg, args.out)
        if args.out:
            print(f"wrote {args.out} ({cfg.name}): read by --config {args.out}")
        else:
            json.dump(configs.to_dict(cfg), sys.stdout, indent=2)
            print()
        return 0
    if args.forward:  # a bad name exits 2 before the table (seconds of MAC counting)
        try:
            get_config(args.forward)
        except KeyError as err:
            parser.error(str(err.args[0]))
    print_summary()
    if args.forward:
        r = forward_once(args.forward, size=args.size, device=args.device)
        print(f"\n{r['name']}: input {r['input']} -> logits {r['logits']} on {r['device']} "
              f"in {r['seconds']:.2f} s (random weights)")
    return 0
