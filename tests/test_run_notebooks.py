"""benchmarks/run_notebooks.py: the notebooks' code without Jupyter (for a bare GPU machine)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "benchmarks" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)


def write_notebook(path: Path, *sources: str, unsolved: tuple[int, ...] = ()) -> Path:
    cells = [{"cell_type": "markdown", "source": ["# title"], "metadata": {}}]
    cells += [{"cell_type": "code", "source": [s],
               "metadata": {"tags": ["raises-exception"]} if i in unsolved else {},
               "outputs": [], "execution_count": None} for i, s in enumerate(sources)]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                "nbformat_minor": 5}))
    return path


def test_cells_share_a_namespace_and_magics_are_dropped(tmp_path):
    nb = write_notebook(tmp_path / "ok.ipynb", "%matplotlib inline\nx = 2",
                        "import matplotlib.pyplot as plt\nplt.plot([x, x])\nplt.show()",
                        "assert x == 2\nopen('here.txt', 'w').write('ran in the notebook folder')")
    assert run_notebooks.code_cells(nb)[0] == "x = 2"
    ok, message = run_notebooks.run_notebook(nb)
    assert ok, message
    assert (tmp_path / "here.txt").exists()


def test_a_failing_cell_is_named(tmp_path):
    nb = write_notebook(tmp_path / "bad.ipynb", "y = 1", "assert y == 2, 'y is not 2'")
    ok, message = run_notebooks.run_notebook(nb)
    assert not ok
    assert message.startswith("cell 2:") and "y is not 2" in message
    assert run_notebooks.main([str(nb)]) == 1


def test_an_unsolved_exercise_must_raise_not_implemented(tmp_path):
    unsolved = "def f():\n    raise NotImplementedError('exercise')\nf()"
    ok, message = run_notebooks.run_notebook(
        write_notebook(tmp_path / "student.ipynb", "y = 1", unsolved, "assert y == 1", unsolved=(1,)))
    assert ok, message
    ok, message = run_notebooks.run_notebook(
        write_notebook(tmp_path / "solved.ipynb", "y = 1", "y = 2", unsolved=(1,)))
    assert not ok and "without raising" in message
    ok, message = run_notebooks.run_notebook(write_notebook(tmp_path / "untagged.ipynb", unsolved))
    assert not ok and message.startswith("cell 1:")
