"""The notebooks open in JupyterLab as they are committed, and a student works on a copy.

- Every notebook's kernelspec is the one `ipykernel` installs ("Python 3 (ipykernel)", name
  `python3`): with another display name JupyterLab rewrites it on opening, and the notebook
  opens already marked modified.
- jupytext's settings are in the repository (`jupytext.toml`: the pairing and metadata filters
  of the headers) and so is JupyterLab's default viewer for `.py` files, jupytext's notebook
  view (`notebooks/jupyter-config/labconfig`, used with `JUPYTER_CONFIG_PATH`).
- `make course` copies the student notebooks into a scratch folder and never overwrites one
  there (the student's work).
"""
from __future__ import annotations

import json
import shutil
import subprocess

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(NOTEBOOKS.glob("solutions/[0-9][0-9]_*.ipynb"))


def test_kernelspec_is_the_installed_one():
    from ipykernel.kernelspec import get_kernel_dict

    installed = get_kernel_dict()["display_name"]
    assert installed == "Python 3 (ipykernel)"
    for path in PATHS:
        spec = json.loads(path.read_text(encoding="utf-8"))["metadata"]["kernelspec"]
        assert spec == {"display_name": installed, "language": "python", "name": "python3"}, path
        assert f"display_name: {installed}" in path.with_suffix(".py").read_text(encoding="utf-8"), path


def test_jupytext_and_lab_settings_are_in_the_repository():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "jupytext.toml").read_text(encoding="utf-8"))
    header = (NOTEBOOKS / "solutions" / "01_dilated_resnet.py").read_text(encoding="utf-8")
    assert f"formats: {config['formats']}" in header
    assert f"notebook_metadata_filter: {config['notebook_metadata_filter']}" in header
    assert f"cell_metadata_filter: {config['cell_metadata_filter']}" in header
    overrides = json.loads((NOTEBOOKS / "jupyter-config" / "labconfig" /
                            "default_setting_overrides.json").read_text(encoding="utf-8"))
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers["python"] == "Jupytext Notebook"


def test_lab_reads_the_default_viewer_through_jupyter_config_path(monkeypatch):
    config = pytest.importorskip("jupyter_server.services.config")
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(NOTEBOOKS / "jupyter-config"))
    found = config.ConfigManager(config_dir_name="labconfig").get("default_setting_overrides")
    assert found["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["python"] == "Jupytext Notebook"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_course_copies_the_student_notebooks_and_keeps_work(tmp_path):
    work = tmp_path / "work"
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "course", f"COURSE_WORK={work}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    students = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert sorted(p.name for p in work.iterdir()) == students
    assert (work / students[0]).read_bytes() == (NOTEBOOKS / students[0]).read_bytes()
    (work / students[0]).write_text("my work", encoding="utf-8")
    subprocess.run(["make", "-s", "-C", str(ROOT), "course", f"COURSE_WORK={work}"],
                   capture_output=True, text=True, timeout=60, check=True)
    assert (work / students[0]).read_text(encoding="utf-8") == "my work"
