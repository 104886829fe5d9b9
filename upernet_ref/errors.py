"""The project's expected errors, and how a command tells "before any work" from "during it".

Every `upernet` command turns an expected error into one line, `upernet CMD: error: ...`, and an
exit code (README, "Errors and exit codes"): 2 for a bad argument, configuration, checkpoint or
dataset path found before any work, 1 for a failure during the work, 3 for a non-finite loss.
The library raises ordinary exceptions (a `DataError` is still a `ValueError`, a
`CheckpointError` still a `RuntimeError`), so Python callers catch what they always caught; the
command line (`upernet_ref.cli.common.command`) reads two things from them:

- `exit_code`, a class attribute of `UperNetError` and its subclasses;
- whether the error was raised inside a `before_work()` block (the set-up of a command or of
  `train`: configuration, dataset folders, checkpoints, output folders): then it is exit 2.
"""
from __future__ import annotations

import contextlib
import typing


class UperNetError(Exception):
    """An expected error. Its message names the file, option or configuration at fault."""

    exit_code = 1


class DataError(UperNetError, ValueError):
    """A bad sample on disk (missing, truncated, wrong size, label values outside the class
    set); the message names the file and the problem."""


class UsageError(UperNetError):
    """A bad argument, configuration or path, found before any work (exit 2)."""

    exit_code = 2


@contextlib.contextmanager
def before_work() -> typing.Iterator[None]:
    """Mark errors raised in this block as found before any work (exit 2 on the command line).

    The exception is re-raised unchanged (same type, same message), with the attribute
    `before_work = True`, so a library caller sees exactly what it would without the block.
    """
    try:
        yield
    except Exception as err:
        err.before_work = True  # type: ignore[attr-defined]
        raise


def found_before_work(err: BaseException) -> bool:
    """Whether `err` was raised inside a `before_work()` block (or is a `UsageError`)."""
    return isinstance(err, UsageError) or bool(getattr(err, "before_work", False))


class NonFiniteLossError(UperNetError, RuntimeError):
    """The loss (or a weight) became NaN or infinite; training stopped before applying that
    update or writing anything non-finite (exit 3)."""

    exit_code = 3
