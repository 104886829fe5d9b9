"""Every notebook is a jupytext percent-format `.py` paired with its executed `.ipynb`, in sync,
and every student notebook is derived from its solved source (`notebooks/build.py`).

The `.py` is what reviewers, linters and grep read; the `.ipynb` is what `pytest --nbval` runs
and compares. If one is edited without the other (`python notebooks/build.py NN` re-derives the
student version and re-executes both), this test names the first cell that differs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FOLDERS = [NOTEBOOKS, NOTEBOOKS / "solutions"]
SOURCES = sorted(p for folder in FOLDERS for p in folder.glob("[0-9][0-9]_*.py"))
EXECUTED = sorted(p for folder in FOLDERS for p in folder.glob("[0-9][0-9]_*.ipynb"))


_spec = importlib.util.spec_from_file_location("build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
SOLVED = build.sources()


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


def test_every_notebook_has_a_solution_and_exercises():
    assert [p.name for p in SOLVED] == [p.name for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))]
    for solution in SOLVED:
        text = solution.read_text(encoding="utf-8")
        assert build.BEGIN in text, f"{solution}: no exercise ({build.BEGIN} ... {build.END})"
        assert build.BEGIN_ANSWER in text, f"{solution}: no questionnaire answers"


def _without_tool_version(text: str) -> str:
    """The text less its `jupytext_version:` header line, which names the jupytext that wrote it
    (an upgrade of the installed jupytext changes it, not the notebook)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not line.lstrip("# ").startswith("jupytext_version:"))


@pytest.mark.parametrize("solution", SOLVED, ids=[p.name for p in SOLVED])
def test_student_version_is_derived_from_the_solution(solution: Path):
    student = NOTEBOOKS / solution.name
    derived = _without_tool_version(build.student_text(solution))
    assert _without_tool_version(student.read_text(encoding="utf-8")) == derived, (
        f"{student} is not the student version of {solution}: PYTHONPATH=. python notebooks/build.py "
        f"{solution.name[:2]}")


def test_student_version_strips_solutions_and_answers():
    nb = jupytext.reads("""# %% [markdown]
# 1. Why?
#    <!-- BEGIN ANSWER -->
#    Because.
#    <!-- END ANSWER -->

# %%
def f(x):
    ### BEGIN SOLUTION
    y = x + 1
    return y
    ### END SOLUTION

# %%
print(1)
""", fmt="py:percent")
    student = build.student_version(nb)
    assert "Because" not in student.cells[0].source and "1. Why?" in student.cells[0].source
    assert "x + 1" not in student.cells[1].source
    assert "    " + build.UNSOLVED in student.cells[1].source
    assert student.cells[1].metadata["tags"] == ["raises-exception"]
    assert "tags" not in student.cells[2].metadata
    with pytest.raises(ValueError, match="without"):
        build.student_version(jupytext.reads("# %%\n### BEGIN SOLUTION\nx = 1\n", fmt="py:percent"))


def test_a_cell_that_uses_an_exercise_may_raise_in_the_student_version():
    nb = jupytext.reads("""# %%
def f(x):
    ### BEGIN SOLUTION
    return x + 1
    ### END SOLUTION

# %% tags=["uses-exercise"]
assert f(1) == 2

# %%
print(2)
""", fmt="py:percent")
    student = build.student_version(nb)
    assert student.cells[1].metadata["tags"] == [build.USES_EXERCISE, build.EXPECTED_TO_RAISE]
    assert "tags" not in student.cells[2].metadata
    assert nb.cells[1].metadata["tags"] == [build.USES_EXERCISE]  # the solved copy runs it


@pytest.mark.parametrize("solution", SOLVED, ids=[p.name for p in SOLVED])
def test_the_same_cells_run_on_a_gpu(solution: Path):
    """Device chosen by the package, TF32 off before float32 comparisons, no unsynchronised clock."""
    text = solution.read_text(encoding="utf-8")
    if "device" in text.replace('torch.device("meta")', "").replace('device="meta"', ""):
        assert "device = course.pick_device()" in text, f"{solution}: choose the device with course.pick_device()"
    if "assert_close" in text and "to(device)" in text:
        assert "course.exact_comparisons()" in text, (
            f"{solution}: compares float32 results on the device without course.exact_comparisons() "
            f"(TF32 would break the tolerances on Ampere+ GPUs)")
    for clock in ("time.perf_counter", "time.time("):
        assert clock not in text, (f"{solution}: times with {clock}; use perf.bench.time_calls, which "
                                   f"synchronises CUDA before reading the clock")
