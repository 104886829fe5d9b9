"""`make test` runs every test in tests/: the unit tests (`-m "not slow"`), then the end-to-end
checks marked slow (`-m slow`), so the split into a quick step and a slow one leaves none out.

A developer's quick loop is `pytest -m "not slow" tests` (the README gives its time on an idle
2-core machine); CI runs `make test`, both steps and the notebooks.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_target_steps() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    steps = [line.strip() for line in recipe.splitlines()[1:] if not line.strip().startswith("#")]
    selections = [re.search(r"-m (\"not slow\"|slow) tests$", s) for s in steps if " pytest " in s]
    found = [m.group(1) for m in selections if m]
    assert found == ['"not slow"', "slow"], (
        f"make test must run pytest -m \"not slow\" tests, then -m slow tests: {steps}")
    assert not any(" pytest " in s and " tests" in s and "-m " not in s for s in steps)


def test_the_slow_marker_is_registered() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"markers = \[\"slow: ", text), "pyproject.toml registers the slow marker"
