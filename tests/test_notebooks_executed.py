"""Every committed notebook must be executed: outputs present, no errors, all cells run in order.

`pytest --nbval` compares a notebook's stored outputs with a fresh run, so a notebook saved
without outputs passes while checking nothing (shared/STYLE.md). This test closes that hole.
Execute a notebook from its jupytext source with `python notebooks/build.py NN`. A student
notebook's unsolved exercise cells (tagged `raises-exception`) are saved with their
`NotImplementedError`; any other error is a problem.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_problems(nb: dict) -> list[str]:
    """What is wrong with a notebook (parsed .ipynb JSON) as a committed, executed notebook."""
    problems = []
    code_cells = [(i, c) for i, c in enumerate(nb.get("cells", []))
                  if c.get("cell_type") == "code" and "".join(c.get("source", "")).strip()]
    if not code_cells:
        return problems
    if not any(c.get("outputs") for _, c in code_cells):
        problems.append("has code cells but no outputs (saved without executing)")
    counts = []
    for i, cell in code_cells:
        count = cell.get("execution_count")
        if count is None:
            problems.append(f"code cell {i} was not executed")
        else:
            counts.append(count)
        for out in cell.get("outputs", []):
            unsolved = ("raises-exception" in cell.get("metadata", {}).get("tags", ())
                        and out.get("ename") == "NotImplementedError")
            if out.get("output_type") == "error" and not unsolved:
                problems.append(f"code cell {i} was saved with an error: "
                                f"{out.get('ename')}: {out.get('evalue')}")
    if counts != sorted(counts) or len(set(counts)) != len(counts):
        problems.append(f"code cells were not executed top to bottom (execution counts {counts})")
    return problems


NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb")) + sorted(NOTEBOOKS.glob("solutions/*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=[str(p.relative_to(NOTEBOOKS)) for p in NOTEBOOK_FILES])
def test_notebook_is_executed(path: Path):
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        pytest.fail(f"{path}: not valid notebook JSON ({e})")
    problems = notebook_problems(nb)
    assert not problems, f"{path}:\n  " + "\n  ".join(problems)


def test_there_are_notebooks():
    assert NOTEBOOK_FILES, f"no notebooks found in {NOTEBOOKS}"


# The checker itself must be able to fail.
def _cell(source: str, count: int | None, outputs: list | None = None, tags=()) -> dict:
    return {"cell_type": "code", "source": source, "execution_count": count,
            "outputs": outputs or [], "metadata": {"tags": list(tags)}}


_UNSOLVED = [{"output_type": "error", "ename": "NotImplementedError", "evalue": "exercise",
              "traceback": []}]


_PRINTED = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]


def test_checker_accepts_an_executed_notebook():
    nb = {"cells": [{"cell_type": "markdown", "source": "# t"}, _cell("x = 1", 1),
                    _cell("print(x)", 2, _PRINTED), _cell("", None),
                    _cell("raise NotImplementedError", 3, _UNSOLVED, ["raises-exception"])]}
    assert notebook_problems(nb) == []


@pytest.mark.parametrize("cells, message", [
    ([_cell("x = 1", None), _cell("print(x)", None)], "no outputs"),
    ([_cell("x = 1", None), _cell("print(x)", 2, _PRINTED)], "not executed"),
    ([_cell("print(x)", 1, [{"output_type": "error", "ename": "NameError",
                             "evalue": "x", "traceback": []}])], "error"),
    ([_cell("x = 1", 2), _cell("print(x)", 1, _PRINTED)], "top to bottom"),
    ([_cell("raise NotImplementedError", 1, _UNSOLVED)], "error"),  # not tagged as an exercise
])
def test_checker_rejects(cells, message):
    problems = notebook_problems({"cells": cells})
    assert any(message in p for p in problems), problems
