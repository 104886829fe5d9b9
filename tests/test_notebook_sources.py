"""Every notebook is a jupytext percent-format `.py` paired with its executed `.ipynb`, in sync.

The `.py` is what reviewers, linters and grep read; the `.ipynb` is what `pytest --nbval` runs
and compares. If one is edited without the other (`python notebooks/build.py NN` re-executes a
source into its notebook), this test names the first cell that differs.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FOLDERS = [NOTEBOOKS] + [p for p in [NOTEBOOKS / "solutions"] if p.is_dir()]
SOURCES = sorted(p for folder in FOLDERS for p in folder.glob("[0-9][0-9]_*.py"))
EXECUTED = sorted(p for folder in FOLDERS for p in folder.glob("[0-9][0-9]_*.ipynb"))


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ())))
            for c in nb.cells]


def pair_differences(source_nb, executed_nb) -> list[str]:
    """How the notebook read from a `.py` differs from its `.ipynb` (cells, sources, tags)."""
    a, b = _cells(source_nb), _cells(executed_nb)
    problems = []
    if len(a) != len(b):
        problems.append(f"{len(a)} cells in the .py, {len(b)} in the .ipynb")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            what = "type" if x[0] != y[0] else "source" if x[1] != y[1] else "tags"
            problems.append(f"cell {i} differs in {what}: .py {x[1][:60]!r} vs .ipynb {y[1][:60]!r}")
            break
    if executed_nb.metadata.get("jupytext", {}).get("formats") != "ipynb,py:percent":
        problems.append("the .ipynb is not paired with a py:percent file (metadata.jupytext.formats)")
    return problems


def test_there_are_pairs():
    assert SOURCES and len(SOURCES) == len(EXECUTED)
    assert [p.stem for p in SOURCES] == [p.stem for p in EXECUTED]


@pytest.mark.parametrize("source", SOURCES, ids=[str(p.relative_to(NOTEBOOKS)) for p in SOURCES])
def test_pair_in_sync(source: Path):
    executed = source.with_suffix(".ipynb")
    assert executed.exists(), f"{source} has no executed notebook: python notebooks/build.py {source.name[:2]}"
    problems = pair_differences(jupytext.read(source), nbformat.read(executed, as_version=4))
    assert not problems, (f"{source} and {executed.name} are out of sync "
                          f"(python notebooks/build.py {source.name[:2]}):\n  " + "\n  ".join(problems))


def test_checker_sees_an_edit():
    source = SOURCES[0]
    nb = jupytext.read(source)
    executed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert pair_differences(nb, executed) == []
    nb.cells[1].source += "\nprint('edited')"
    assert any("cell 1 differs in source" in p for p in pair_differences(nb, executed))
    nb.cells.pop()
    assert any("cells in the .py" in p for p in pair_differences(nb, executed))
