"""Execute the notebooks: each jupytext percent-format `NN_name.py` into its paired `NN_name.ipynb`.

    python notebooks/build.py [NN ...]        # default: every notebook; e.g. `build.py 06 08`

The `.py` file is the source (edit it, or edit the notebook in Jupyter with jupytext installed:
the pair stays in sync); the `.ipynb` is its executed copy, committed with outputs because
`pytest --nbval` compares a fresh run with them. Run from the repository root with the package
importable (`PYTHONPATH=.`). `tests/test_notebook_sources.py` checks that every pair is in sync.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent


def sources(folder: Path = NOTEBOOKS) -> list[Path]:
    """The notebook sources (`NN_name.py`) in `folder`, in course order."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def execute(source: Path, timeout: int = 600) -> Path:
    """Run `source` top to bottom in a fresh kernel (in its folder) and write its `.ipynb`."""
    nb = jupytext.read(source)
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"  # stable ids: a rebuild changes only what really changed
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(source.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps
    target = source.with_suffix(".ipynb")
    tmp = target.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(target)
    return target


def main(argv: list[str]) -> int:
    chosen = [p for p in sources() if not argv or p.name[:2] in argv]
    if not chosen:
        print(f"build.py: error: no notebook matches {' '.join(argv)}", file=sys.stderr)
        return 2
    for source in chosen:
        print(f"executing {source.name}", flush=True)
        execute(source)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
