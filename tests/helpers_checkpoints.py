"""Key-renaming tables that fabricate "published" checkpoints from our state dicts (spec section 2).

They are written independently of `upernet_ref.checkpoints`, whose rules go the other way
(published -> ours): a test that fabricates a file here and loads it back checks one table
against the other.

    ours ("decode_head.fuse.conv.weight")
      -> sssegmentation ("decoder.0.weight")                          OURS_TO_SSSEGMENTATION
      -> mmsegmentation ("decode_head.fpn_bottleneck.conv.weight")    SSSEGMENTATION_TO_MMSEG
"""
from __future__ import annotations

import re
import typing

Rules = list[tuple[str, str]]

OURS_TO_SSSEGMENTATION: Rules = [
    (r"^backbone\.", "backbone_net."),
    (r"^decode_head\.ppm\.branches\.(\d+)\.conv\.", r"ppm_net.branches.\1.1."),
    (r"^decode_head\.ppm\.branches\.(\d+)\.bn\.", r"ppm_net.branches.\1.2."),
    (r"^decode_head\.ppm\.bottleneck\.conv\.", "ppm_net.bottleneck.0."),
    (r"^decode_head\.ppm\.bottleneck\.bn\.", "ppm_net.bottleneck.1."),
    (r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.", r"\1.\2.0."),
    (r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.bn\.", r"\1.\2.1."),
    (r"^decode_head\.fuse\.conv\.", "decoder.0."),
    (r"^decode_head\.fuse\.bn\.", "decoder.1."),
    (r"^decode_head\.classifier\.", "decoder.4."),
    (r"^aux_head\.conv\.conv\.", "auxiliary_decoder.0."),
    (r"^aux_head\.conv\.bn\.", "auxiliary_decoder.1."),
    (r"^aux_head\.classifier\.", "auxiliary_decoder.4."),
]

SSSEGMENTATION_TO_MMSEG: Rules = [
    (r"^backbone_net\.", "backbone."),
    (r"^ppm_net\.branches\.(\d+)\.1\.", r"decode_head.psp_modules.\1.1.conv."),
    (r"^ppm_net\.branches\.(\d+)\.2\.", r"decode_head.psp_modules.\1.1.bn."),
    (r"^ppm_net\.bottleneck\.0\.", "decode_head.bottleneck.conv."),
    (r"^ppm_net\.bottleneck\.1\.", "decode_head.bottleneck.bn."),
    (r"^(lateral_convs|fpn_convs)\.(\d+)\.0\.", r"decode_head.\1.\2.conv."),
    (r"^(lateral_convs|fpn_convs)\.(\d+)\.1\.", r"decode_head.\1.\2.bn."),
    (r"^decoder\.0\.", "decode_head.fpn_bottleneck.conv."),
    (r"^decoder\.1\.", "decode_head.fpn_bottleneck.bn."),
    (r"^decoder\.4\.", "decode_head.conv_seg."),
    (r"^auxiliary_decoder\.0\.", "auxiliary_head.convs.0.conv."),
    (r"^auxiliary_decoder\.1\.", "auxiliary_head.convs.0.bn."),
    (r"^auxiliary_decoder\.4\.", "auxiliary_head.conv_seg."),
]


def rename_key(key: str, rules: Rules) -> str:
    """`key` renamed by the first rule whose pattern matches; AssertionError when none does."""
    for pattern, repl in rules:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    raise AssertionError(f"no renaming rule for {key!r}")


def to_sssegmentation(state_dict: typing.Mapping[str, typing.Any]) -> dict[str, typing.Any]:
    """Our state dict under sssegmentation's names (what its released files hold)."""
    return {rename_key(key, OURS_TO_SSSEGMENTATION): value for key, value in state_dict.items()}


def to_mmseg(key: str) -> str:
    """An sssegmentation key under mmsegmentation's name for the same tensor."""
    return rename_key(key, SSSEGMENTATION_TO_MMSEG)
