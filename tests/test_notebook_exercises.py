"""In every student notebook, no cell above an exercise shows its solution; every notebook has a
ramp of at least three exercises.

An exercise the student can read the answer to, a few cells up (a sketch with the same code, or
an `inspect.getsource` of the package function it asks for), teaches nothing (issue 17). For
every exercise of every solved notebook, the distinctive lines of its solution (the code between
`### BEGIN SOLUTION` and `### END SOLUTION`, whitespace and a leading `return` removed, at least
24 characters, not a `for ...:` or `with ...:` header) must not
appear in the source or the output of any earlier cell of the executed student notebook. The
reveal and the "by hand == package" check come after the exercise.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
SOLVED = build.sources()
MIN_CHARS = 24


def _squeeze(text: str) -> str:
    return "".join(text.split())


def solution_lines(source: str) -> list[str]:
    """The distinctive lines of the solutions in one code cell's source, whitespace removed."""
    lines, inside = [], False
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped in (build.BEGIN, build.END):
            inside = stripped == build.BEGIN
        elif inside and stripped and not stripped.startswith("#"):
            code = _squeeze(line.split("  #")[0]).removeprefix("return")  # the expression is the answer
            if len(code) >= MIN_CHARS and not code.endswith(":"):  # a `with ...:` or `for ...:` header is not an answer
                lines.append(code)
    return lines


def cell_text(cell) -> str:
    """A cell's source and the text of its outputs (printed, displayed, errors)."""
    parts = [cell.get("source", "")]
    for out in cell.get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.append("".join(out.get("data", {}).get("text/plain", "")))
        parts.append(str(out.get("evalue", "")))
    return "\n".join(parts)


def revealed_early(solved, student) -> list[str]:
    """'cell K: line' for each solution line found in a cell above its exercise."""
    assert len(solved.cells) == len(student.cells)
    seen, problems = "", []
    for k, (cell, shown) in enumerate(zip(solved.cells, student.cells)):
        if cell.cell_type == "code":
            for line in solution_lines(cell.source):
                if line in seen:
                    problems.append(f"exercise in cell {k}: {line!r} is shown above it")
        seen += _squeeze(cell_text(shown))
    return problems


@pytest.mark.parametrize("solution", SOLVED, ids=[p.name for p in SOLVED])
def test_no_solution_above_its_exercise(solution: Path):
    student = nbformat.read(NOTEBOOKS / solution.with_suffix(".ipynb").name, as_version=4)
    problems = revealed_early(jupytext.read(solution), student)
    assert not problems, f"{solution.name}:\n  " + "\n  ".join(problems)


def test_every_exercise_has_distinctive_lines():
    for solution in SOLVED:
        for cell in jupytext.read(solution).cells:
            if cell.cell_type == "code" and build.BEGIN in cell.source:
                assert solution_lines(cell.source), f"{solution.name}: an exercise too short to check"


def test_the_check_sees_a_reveal():
    solved = jupytext.reads('''# %%
import inspect

# %%
def f(x):
    ### BEGIN SOLUTION
    return torch.where(x > 0, x * 2, x - 1)
    ### END SOLUTION
''', fmt="py:percent")
    student = build.student_version(solved)
    assert revealed_early(solved, student) == []
    student.cells[0]["outputs"] = [{"output_type": "stream", "name": "stdout",
                                    "text": "def g(x):\n    return torch.where(x > 0, x * 2, x - 1)\n"}]
    assert len(revealed_early(solved, student)) == 1
    student.cells[0]["outputs"] = []
    student.cells[0]["source"] = "y = torch.where(x > 0,\n  x * 2, x - 1)"
    assert len(revealed_early(solved, student)) == 1


MIN_EXERCISES = 3  # issue 17: a ramp of warm-up, core and stretch in every notebook


@pytest.mark.parametrize("solution", SOLVED, ids=[p.name for p in SOLVED])
def test_every_notebook_has_a_ramp_of_exercises(solution: Path):
    exercises = [cell for cell in jupytext.read(solution).cells
                 if cell.cell_type == "code" and build.BEGIN in cell.source]
    assert len(exercises) >= MIN_EXERCISES, (
        f"{solution.name}: {len(exercises)} exercise cells, at least {MIN_EXERCISES} expected (warm-up, core, stretch)")
