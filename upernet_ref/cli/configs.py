"""`upernet configs`: list the 12 published configurations with their parameters, GMACs and
reported mIoU.

    upernet configs
    upernet configs --forward upernet_r50_os8_ade20k --size 512x512

The library side is `upernet_ref.perf.configs_table`.
"""
from __future__ import annotations
import argparse
from upernet_ref.cli.common import command, parse_pair
from upernet_ref.configs import get_config
from upernet_ref.perf.configs_table import forward_once, format_summary, summary_rows


def print_summary() -> None:
    """The configurations table (`upernet configs`, `upernet demo`), on stdout."""
    print(format_summary(summary_rows()))


@command("upernet configs")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet configs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward", metavar="NAME", help="also run one forward pass of NAME")
    parser.add_argument("--size", type=parse_pair, default=(512, 512),
                        help="forward-pass input size HxW")
    parser.add_argument("--device", default=None,
                        help="device of the forward pass (default: cuda if available)")
    args = parser.parse_args(argv)
    print_summary()
    if args.forward:
        try:
            get_config(args.forward)
        except KeyError as err:
            parser.error(str(err.args[0]))
        r = forward_once(args.forward, size=args.size, device=args.device)
        print(f"\n{r['name']}: input {r['input']} -> logits {r['logits']} on {r['device']} "
              f"in {r['seconds']:.2f} s (random weights)")
    return 0
