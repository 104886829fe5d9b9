"""Every notebook keeps its figures, and none of them is blank.

`pytest --nbval` compares text outputs only (images vary with the matplotlib version), so a
figure that stops being drawn, or comes out empty, would pass unnoticed. This test reads the
committed, executed notebooks (student versions and solutions) and checks the number of image
outputs of each against the course's expected count, and that every image has content.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# The pictures each notebook teaches with (the same in the student version and the solution).
EXPECTED_FIGURES = {
    "01_dilated_resnet": 4,
    "02_pyramid_pooling": 4,
    "03_fpn_fusion": 2,
    "04_data_pipeline": 6,
    "05_losses": 2,
    "06_poly_schedule": 2,
    "07_miou_evaluation": 2,
    "08_training": 4,
    "09_inference": 2,
    "10_capstone": 1,
}
# Where a student version has fewer: its figure is drawn by a cell that uses the student's answers
# (tagged uses-exercise), which raises until the exercises are solved.
STUDENT_FIGURES = {"06_poly_schedule": 1, "10_capstone": 0}
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(NOTEBOOKS.glob("solutions/[0-9][0-9]_*.ipynb"))


def images(nb: dict) -> list[bytes]:
    """The PNG / JPEG outputs of a notebook (parsed .ipynb JSON), in order."""
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            for mime in ("image/png", "image/jpeg"):
                if mime in data:
                    payload = data[mime]
                    found.append(base64.b64decode("".join(payload) if isinstance(payload, list) else payload))
    return found


def blank_reason(raw: bytes) -> str | None:
    """Why an image counts as blank (None if it has content): one colour almost everywhere."""
    pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    drawn = (np.abs(pixels - background).sum(-1) > 30).mean()
    if drawn < 0.01:
        return f"{100 * drawn:.2f}% of its {pixels.shape[1]}x{pixels.shape[0]} pixels differ from the background"
    return None


def test_every_notebook_has_an_expected_count():
    assert {p.stem for p in PATHS} == set(EXPECTED_FIGURES)


@pytest.mark.parametrize("path", PATHS, ids=[str(p.relative_to(NOTEBOOKS)) for p in PATHS])
def test_figures_are_there_and_not_blank(path: Path):
    found = images(json.loads(path.read_text(encoding="utf-8")))
    expected = EXPECTED_FIGURES[path.stem]
    if path.parent == NOTEBOOKS:
        expected = STUDENT_FIGURES.get(path.stem, expected)
    assert len(found) == expected, (
        f"{path}: {len(found)} figures, expected {expected} (a figure vanished, "
        f"or update EXPECTED_FIGURES when adding one)")
    for i, raw in enumerate(found):
        reason = blank_reason(raw)
        assert reason is None, f"{path}: figure {i + 1} is blank: {reason}"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_checker_sees_a_blank_and_a_drawn_figure():
    white = np.full((60, 80, 3), 255)
    assert "differ from the background" in blank_reason(_png(white))
    drawn = white.copy()
    drawn[10:40, 10:50] = (20, 60, 200)
    assert blank_reason(_png(drawn)) is None
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {"image/png": base64.b64encode(_png(drawn)).decode()}},
        {"output_type": "stream", "text": "x"}]}]}
    assert len(images(nb)) == 1
