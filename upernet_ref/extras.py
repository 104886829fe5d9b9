"""The optional parts: what pyproject.toml's extras install, asked for where they are used.

`[hf]` (datasets, huggingface_hub: Hugging Face folders and datasets), `[tb]` (TensorBoard
logs), `[export]` (ONNX), `[prepare]` (scipy: SBD's .mat files). The reading core needs none of
them; the shell imports each through `require`, so a missing one is one line naming the extra.
"""
from __future__ import annotations

import typing

from upernet_ref.errors import UsageError


class MissingExtraError(UsageError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> typing.Any:
    """`import module`, or one line naming the pyproject extra that installs it (`[hf]`, `[tb]`,
    `[export]`, `[prepare]`): the optional parts stay optional, and say what to do."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'upernet_ref[{extra}]'") from None
