"""Tiny helper for the notebook generator scripts: cells as source strings -> .ipynb.

Each `make_NN.py` lists its cells with `md(...)` and `code(...)` and calls `write(path, cells)`.
The notebook is then executed in place (see README of this folder / the Makefile):

    cd notebooks && ../.venv/bin/jupyter nbconvert --to notebook --execute --inplace \
        NN_name.ipynb --ExecutePreprocessor.timeout=600
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent


def md(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(source).strip("\n"))


def code(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(textwrap.dedent(source).strip("\n"))


def write(name: str, cells: list[nbformat.NotebookNode]) -> Path:
    """Write `cells` to notebooks/`name` with a python3 kernelspec (outputs empty)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    path = NOTEBOOKS / name
    nbformat.write(nb, path)
    return path
