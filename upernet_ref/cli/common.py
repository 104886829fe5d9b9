"""What the commands share: argparse types and the one error handler."""
from __future__ import annotations

import argparse


# argparse types shared by the subcommands

def parse_pair(text: str) -> tuple[int, int]:
    """'512x1024' or '512,1024' -> (512, 1024); '512' -> (512, 512)."""
    parts = [p.strip() for p in text.lower().replace("x", ",").split(",")]
    if "" in parts:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x1024) or one size, got {text!r}")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW with positive sizes, got {text!r}")
    return values  # type: ignore[return-value]


def positive_int(text: str) -> int:
    """'4' -> 4; zero, negative or non-integer values are refused with a message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive scales, got {text!r}")
    return values
