"""Build the course: student notebooks from the solved sources, each executed into its `.ipynb`.

    PYTHONPATH=. python notebooks/build.py [NN ...]     # default: every notebook; e.g. `build.py 06 08`
    PYTHONPATH=. python notebooks/build.py --no-execute  # only re-derive the student `.py` files

The sources are the solved notebooks, `notebooks/solutions/NN_name.py`, in jupytext's percent
format (edit them as code, or in Jupyter with jupytext installed). The student version
`notebooks/NN_name.py` is derived from each, the nbgrader way:

- in a code cell, the lines from `### BEGIN SOLUTION` to `### END SOLUTION` become
  `raise NotImplementedError(...)` (at the marker's indentation), and the cell is tagged
  `raises-exception`, so Jupyter, nbclient and `pytest --nbval` expect the unsolved cell to raise;
- a code cell tagged `uses-exercise` (one that calls the student's answer: the "by hand ==
  package" check after an exercise) is tagged `raises-exception` too: until the exercise is
  solved, it raises the exercise's `NotImplementedError`;
- in a markdown cell, the lines from `<!-- BEGIN ANSWER -->` to `<!-- END ANSWER -->` (the
  questionnaire's answers) are left out.

Both versions are then executed top to bottom in a fresh kernel, in their folder, into their
paired `.ipynb` (committed with outputs: `pytest --nbval` compares a fresh run with them).
`tests/test_notebook_sources.py` checks that every student file is derived from its solution
and that every `.py` / `.ipynb` pair is in sync.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import jupytext
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
SOLUTIONS = NOTEBOOKS / "solutions"
FORMAT = "py:percent"
UNSOLVED = 'raise NotImplementedError("exercise: replace this line with your code")'
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_ANSWER, END_ANSWER = "<!-- BEGIN ANSWER -->", "<!-- END ANSWER -->"
EXPECTED_TO_RAISE = "raises-exception"
USES_EXERCISE = "uses-exercise"


def sources() -> list[Path]:
    """The solved notebooks (`solutions/NN_name.py`), in course order."""
    return sorted(SOLUTIONS.glob("[0-9][0-9]_*.py"))


def _strip(lines: list[str], begin: str, end: str, replacement: str | None) -> tuple[list[str], bool]:
    out, inside, found = [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped == begin:
            if inside:
                raise ValueError(f"nested {begin!r}")
            inside, found = True, True
            if replacement is not None:
                out.append(line[: len(line) - len(line.lstrip())] + replacement)
        elif stripped == end:
            if not inside:
                raise ValueError(f"{end!r} without {begin!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{begin!r} without {end!r}")
    return out, found


def student_version(solved: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with its solutions and questionnaire answers taken out (see the module doc)."""
    nb = copy.deepcopy(solved)
    for cell in nb.cells:
        lines = cell.source.split("\n")
        if cell.cell_type == "code":
            lines, found = _strip(lines, BEGIN, END, UNSOLVED)
            if found or USES_EXERCISE in cell.metadata.get("tags", ()):
                tags = list(cell.metadata.get("tags", []))
                cell.metadata["tags"] = tags + [EXPECTED_TO_RAISE] * (EXPECTED_TO_RAISE not in tags)
        elif cell.cell_type == "markdown":
            lines, _ = _strip(lines, BEGIN_ANSWER, END_ANSWER, None)
        cell.source = "\n".join(lines)
    return nb


def student_text(solution: Path) -> str:
    """The text of the student `.py` derived from `solution`."""
    return jupytext.writes(student_version(jupytext.read(solution)), fmt=FORMAT)


def execute(source: Path, timeout: int = 600) -> Path:
    """Run `source` top to bottom in a fresh kernel (in its folder) and write its `.ipynb`."""
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"  # stable ids: a rebuild changes only what really changed
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(source.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if not _machine_noise(o)]
    target = source.with_suffix(".ipynb")
    _write(target, nbformat.writes(nb) + "\n")
    return target


def _machine_noise(output) -> bool:
    """tqdm's import-time warning in a kernel without ipywidgets (huggingface_hub imports
    `tqdm.auto`): it names this machine's paths and says nothing about the course."""
    return (output.get("name") == "stderr"
            and "TqdmWarning: IProgress not found" in "".join(output.get("text", "")))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    run = "--no-execute" not in argv
    wanted = [a for a in argv if a != "--no-execute"]
    chosen = [p for p in sources() if not wanted or p.name[:2] in wanted]
    if not chosen:
        print(f"build.py: error: no notebook in {SOLUTIONS} matches {' '.join(wanted)}", file=sys.stderr)
        return 2
    for solution in chosen:
        student = NOTEBOOKS / solution.name
        _write(student, student_text(solution))
        for path in (student, solution) if run else ():
            print(f"executing {path.relative_to(NOTEBOOKS)}", flush=True)
            start = time.monotonic()
            execute(path)
            print(f"executed {path.relative_to(NOTEBOOKS)} in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
