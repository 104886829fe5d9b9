"""What a non-editable install gets: a wheel built from pyproject.toml carries the demo
checkpoint as package data (so `course.DEMO_CHECKPOINT` exists in site-packages) and states the
licence; the LICENSE and CITATION.cff files say the same."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_finds_the_demo_checkpoint(tmp_path):
    src = tmp_path / "src"  # a copy: building in the tree would leave build/ and *.egg-info
    shutil.copytree(ROOT / "upernet_ref", src / "upernet_ref",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"),
                            str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("upernet_ref-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "upernet_ref/assets/upernet_small_demo.safetensors" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata and "Provides-Extra: hf" in metadata
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = ("import upernet_ref.course as c, hashlib; p = c.DEMO_CHECKPOINT; "
             "print(p); assert hashlib.sha256(p.read_bytes()).hexdigest() == "
             "c.DEMO_CHECKPOINT_SHA256")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(target))  # the installed copy, not this tree


def test_licence_and_citation_agree_with_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["license"] == "MIT" and citation["version"] == project["version"]
    assert citation["preferred-citation"]["title"] == ("Unified Perceptual Parsing for Scene "
                                                       "Understanding")
    from upernet_ref.hub import LICENSE
    assert LICENSE == project["license"].lower()  # the model card's licence is the code's


def test_a_missing_extra_is_named_in_one_line(monkeypatch, tmp_path, capsys):
    """Without onnx (the [export] extra) or datasets ([hf]) the command says which extra to
    install, in one line, before any work (exit 2)."""
    from upernet_ref.cli import main as upernet
    for module in ("onnx", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # `import onnx` raises ImportError
    assert upernet(["export", "--config", "upernet_small_test", "--format", "onnx", "--out",
                    str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("upernet export: error: the ONNX export needs onnx, which is not installed: "
                   "pip install 'upernet_ref[export]'")
    assert upernet(["train", "--config", "upernet_small_test", "--data.dataset=hf",
                    "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'upernet_ref[hf]'" in capsys.readouterr().err
