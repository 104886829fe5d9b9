"""Results as a person reads them: the per-class IoU / accuracy table of an evaluation
(`upernet eval`, `upernet demo`), from the metrics of `evaluation.metrics.summarize`."""
from __future__ import annotations

import math
import typing


def _pct(x: float) -> str:
    return "   nan" if math.isnan(x) else f"{100 * x:6.2f}"


def format_table(summary: dict[str, typing.Any], class_names: typing.Sequence[str] | None = None) -> str:
    """The per-class IoU / Acc table (percent) followed by the summary line."""
    n = len(summary["iou"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for {n} classes")
    width = max(5, *(len(s) for s in names))
    lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 14)]
    for name, iou, acc in zip(names, summary["iou"], summary["acc"]):
        lines.append(f"{name:<{width}} {_pct(iou)} {_pct(acc)}")
    lines.append("-" * (width + 14))
    lines.append(f"mIoU {_pct(summary['miou']).strip()}  mAcc {_pct(summary['macc']).strip()}  "
                 f"aAcc {_pct(summary['aacc']).strip()}")
    return "\n".join(lines)
