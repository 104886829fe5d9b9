"""The GPU branch of notebooks 01-03 passes nbval on a CPU (`UPERNET_COURSE_FULL_SIZE=1`).

On a GPU, `course.full_size(device)` makes notebooks 01-03 compare their hand-built pieces with
the package at the published widths and depths. Their printed output must be the one committed
(from a CPU run at small sizes), or `make test` fails on a GPU machine although every
`assert_close` holds. The environment variable selects the same branch on any machine, so this
test runs the solved 01-03 under `pytest --nbval` with it set (the published R-50, PPM and head
on 128x128 inputs: about half a minute of CPU time in all).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from upernet_ref import course

ROOT = Path(__file__).resolve().parent.parent
SOLVED = sorted((ROOT / "notebooks" / "solutions").glob("0[1-3]_*.ipynb"))


def test_the_variable_selects_the_full_size_branch(monkeypatch):
    import torch

    monkeypatch.delenv(course.FULL_SIZE_VARIABLE, raising=False)
    assert not course.full_size(torch.device("cpu"))
    assert course.full_size(torch.device("cuda"))
    monkeypatch.setenv(course.FULL_SIZE_VARIABLE, "1")
    assert course.full_size(torch.device("cpu"))
    monkeypatch.setenv(course.FULL_SIZE_VARIABLE, "0")
    assert not course.full_size(torch.device("cpu"))


def test_notebooks_01_to_03_use_it():
    assert [p.name[:2] for p in SOLVED] == ["01", "02", "03"]
    for path in SOLVED:
        text = path.with_suffix(".py").read_text(encoding="utf-8")
        assert "full_size = course.full_size(device)" in text, path


@pytest.mark.slow
def test_solved_01_to_03_pass_nbval_at_full_size():
    pytest.importorskip("nbval")
    env = dict(os.environ, **{course.FULL_SIZE_VARIABLE: "1"})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval", "--nbval-current-env",
                          "-p", "no:cacheprovider", *map(str, SOLVED)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
