"""Run every notebook's code on a machine without Jupyter (e.g. a bare GPU machine).

    python benchmarks/run_notebooks.py [NOTEBOOK ...]
        # default: the student notebooks notebooks/[0-9]*.ipynb, then notebooks/solutions/

`pytest --nbval` is the notebooks' real test: it compares every output with the committed one,
and the notebooks are written to print the same things on a GPU as on a CPU. In 01-03 the
full-size branch that a GPU selects (`course.full_size`) prints what the small CPU branch prints
(`tests/test_notebook_full_size.py` runs it under nbval on a CPU, `UPERNET_COURSE_FULL_SIZE=1`);
the cells whose output depends on the machine (timings, trained numbers, 08's GPU-only run) are
marked `# NBVAL_IGNORE_OUTPUT`; `conftest.py` leaves stderr, HTML and tracebacks out of the
comparison and `notebooks/sanitize.cfg` masks addresses and times. So where Jupyter is
installed, `pytest --nbval` is the test on a GPU machine too. This script is for a machine
without Jupyter (no nbval, nbclient or ipykernel): it tells whether every cell runs, and how long
each notebook takes, with nothing but the package's own dependencies: each notebook's code cells
run in order in one namespace, in the notebook's folder, with IPython's line magics (`%matplotlib`,
`%config`) dropped and figures drawn off-screen (Agg). A student notebook's unsolved exercise
cells (tagged `raises-exception`) must raise `NotImplementedError`; every other cell must run.
It prints one line per notebook (seconds, or the failing cell and its error) and exits 1 if any
failed.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def code_cells(path: Path) -> list[str]:
    """The source of the notebook's code cells, IPython magics and shell lines removed."""
    return [source for source, _ in _code_cells(path)]


def _code_cells(path: Path) -> list[tuple[str, bool]]:
    """(source, expected to raise NotImplementedError) of each code cell."""
    notebook = json.loads(path.read_text())
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        unsolved = "raises-exception" in cell.get("metadata", {}).get("tags", ())
        cells.append(("\n".join(lines), unsolved))
    return cells


def run_notebook(path: Path) -> tuple[bool, str]:
    """(passed, message): run the code cells of `path` in its folder, in a fresh namespace."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cwd = Path.cwd()
    namespace: dict = {"__name__": "__main__"}
    start = time.perf_counter()
    os.chdir(path.parent)
    try:
        for number, (source, unsolved) in enumerate(_code_cells(path), 1):
            try:
                exec(compile(source, f"{path.name}[cell {number}]", "exec"), namespace)
                if unsolved:
                    return False, f"cell {number}: an unsolved exercise ran without raising NotImplementedError"
            except NotImplementedError:
                if not unsolved:
                    return False, f"cell {number}: " + traceback.format_exc(limit=-3).strip()
            except Exception:  # noqa: BLE001 - reported, the next notebook still runs
                return False, f"cell {number}: " + traceback.format_exc(limit=-3).strip()
            finally:
                plt.close("all")
    finally:
        os.chdir(cwd)
    return True, f"{time.perf_counter() - start:.1f} s"


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))  # the package without `pip install -e .`
    paths = [Path(p).resolve() for p in argv] or (sorted((root / "notebooks").glob("[0-9]*.ipynb"))
                                                  + sorted((root / "notebooks" / "solutions").glob("[0-9]*.ipynb")))
    failed = 0
    for path in paths:
        ok, message = run_notebook(path)
        failed += not ok
        print(f"{'ok    ' if ok else 'FAILED'} {path.parent.name}/{path.name}: {message}", flush=True)
    print(f"{len(paths) - failed} of {len(paths)} notebooks ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
