"""A run folder through the real command line (issue 19, items 1, 2 and 8): a folder that holds
a run is never overwritten by accident, `--overwrite` moves the earlier run aside, `--resume`
applies the schedule changes it announces (and logs them) and refuses those that would make
another run, temporary files of killed writes are removed, and a stop by a signal that reached
another torchrun rank exits 128 + SIGTERM."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from upernet_ref.cli import main
from upernet_ref.runs import read_log
from upernet_ref.training.schedule import poly_lr

from helpers_cli import one_line, run

TRAIN = ["train", "--config", "upernet_small_test", "--no-progress", "--no-val", "--max-iters", "12"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def stopped_once(tmp_path_factory):
    """A run stopped at iteration 5 of 12 (last.pt, log.jsonl, config.json, curves.png),
    trained once for the module."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(TRAIN + ["--out", str(out), "--stop-at", "5"]) == 0
    return out


@pytest.fixture()
def stopped(stopped_once, tmp_path):
    """A copy of that run of the test's own (the tests change it), bytes and times kept."""
    return Path(shutil.copytree(stopped_once, tmp_path / "run"))


def test_a_folder_holding_a_run_is_refused_without_resume_and_left_unchanged(stopped, capfd):
    before = snapshot(stopped)
    code, out, err = run(capfd, TRAIN + ["--out", str(stopped), "--stop-at", "2"])
    assert code == 2 and "iter" not in out
    one_line(err, "train", f"{stopped} holds a run (iteration 5: last.pt, log.jsonl)",
             "--resume", "--overwrite")
    assert snapshot(stopped) == before
    code, _, err = run(capfd, TRAIN + ["--out", str(stopped), "--resume", "--overwrite"])
    assert code == 2
    one_line(err, "train", "give one")


def test_overwrite_moves_the_earlier_run_aside(stopped, capfd):
    before = snapshot(stopped)
    code, out, err = run(capfd, TRAIN + ["--out", str(stopped), "--stop-at", "2", "--overwrite"])
    assert code == 0, err
    [aside] = stopped.glob("replaced-*")
    assert f"--overwrite: the earlier run (iteration 5: last.pt, log.jsonl) moved to {aside}" in out
    assert snapshot(aside) == before  # nothing of it lost
    assert [r["iter"] for r in read_log(stopped / "log.jsonl")] == [1, 2]


def test_resume_applies_a_new_learning_rate_and_logs_it(stopped, capfd):
    code, out, err = run(capfd, TRAIN + ["--out", str(stopped), "--resume", "--train.lr=0.001",
                                         "--stop-at", "7"])
    assert code == 0, err
    assert "--resume: train.lr 0.05 -> 0.001, applied from iteration 5 on" in out
    records = read_log(stopped / "log.jsonl")
    [resumed] = [r for r in records if r["kind"] == "resume"]
    assert (resumed["iter"], resumed["changes"]) == (5, ["train.lr 0.05 -> 0.001"])
    lrs = {r["iter"]: r["lr"] for r in records if r["kind"] == "train"}
    for it in (6, 7):  # the lr used by iteration it: the new poly curve at it - 1
        assert lrs[it] == pytest.approx(poly_lr(it - 1, 12, 0.001), rel=1e-9)
    assert lrs[5] == pytest.approx(poly_lr(4, 12, 0.05), rel=1e-9)  # the earlier ones kept


@pytest.mark.parametrize("override, said", [
    ("--train.batch_size=2", "train.batch_size 4 -> 2"),
    ("--train.seed=1", "train.seed 0 -> 1"),
    ("--train.momentum=0.5", "train.momentum 0.9 -> 0.5"),
    ("--data.crop_size=16x16", "data.crop_size"),
])
def test_resume_refuses_a_change_that_makes_another_run(stopped, capfd, override, said):
    before = snapshot(stopped)
    code, _, err = run(capfd, TRAIN + ["--out", str(stopped), "--resume", override])
    assert code == 2
    one_line(err, "train", f"--resume {stopped / 'last.pt'}: {said}",
             "would make another run than the one resumed")
    assert snapshot(stopped) == before


def test_temporary_files_of_killed_writes_are_removed(stopped, capfd):
    dead = 4_999_999  # above Linux's largest pid: no such process
    part, tmp = stopped / f".curves.png.{dead}.part", stopped / f".last.pt.{dead}.abcd1234.tmp"
    part.write_bytes(b"")
    tmp.write_bytes(b"half a checkpoint")
    code, out, err = run(capfd, TRAIN + ["--out", str(stopped), "--resume", "--stop-at", "6"])
    assert code == 0, err
    assert not part.exists() and not tmp.exists()
    assert f"removed {part}" in out


def test_a_stop_signalled_on_another_rank_exits_128_plus_sigterm(monkeypatch, tmp_path, capfd):
    """Under torchrun, the ranks the signal did not reach stop with interrupted="signal"."""
    import upernet_ref.cli.train as cli_train
    from upernet_ref.training.trainer import TrainResult

    monkeypatch.setattr(cli_train, "train", lambda *a, **k: TrainResult(
        tmp_path, 3, 12, [], None, interrupted="signal"))
    code, _, err = run(capfd, TRAIN + ["--out", str(tmp_path / "r")])
    assert code == 128 + signal.SIGTERM and err == ""
