"""`upernet configs`: the command line of `upernet_ref.perf.configs_table`."""
from __future__ import annotations
import argparse
from upernet_ref.cli.common import command, parse_pair
from upernet_ref.configs import get_config
from upernet_ref.perf.configs_table import (forward_once, print_summary)
from upernet_ref.perf.configs_table import __doc__ as _LIB_DOC


@command("upernet configs")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet configs", description=_LIB_DOC)
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
