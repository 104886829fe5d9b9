"""The one error handler of the commands (`upernet_ref.cli.common.command`): messages, exit
codes, errors from DataLoader workers."""
from __future__ import annotations

import errno

import pytest
import torch

from upernet_ref.checkpoints import CheckpointError
from upernet_ref.cli.common import (check_writable_folder, command, error_message, exit_code,
                                    unwrap_worker_message)
from upernet_ref.errors import DataError, UsageError, before_work
from upernet_ref.training.trainer import NonFiniteLossError


class _Bad(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise DataError("masks/x.png: label values 9 are outside the valid set 0-2, 255")
        return torch.zeros(1)


def test_an_error_from_a_dataloader_worker_is_its_original_message():
    loader = torch.utils.data.DataLoader(_Bad(), num_workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    assert "Traceback" in str(info.value)  # what torch gives: the worker's whole traceback
    assert error_message(info.value) == "masks/x.png: label values 9 are outside the valid set 0-2, 255"
    assert unwrap_worker_message("plain message") == "plain message"


def test_os_errors_name_the_file_and_the_problem():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.pt")
    assert error_message(full) == "/runs/x/last.pt: no space left on device"
    # re-raised from a worker: torch keeps only the text
    text = ("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most "
            "recent call last):\n  File \"x.py\", line 1, in f\nFileNotFoundError: [Errno 2] No "
            "such file or directory: 'data/a.png'\n")
    assert error_message(FileNotFoundError(text)) == "data/a.png: no such file or directory"


def test_exit_codes_follow_the_readme():
    assert exit_code(UsageError("x")) == 2
    assert exit_code(DataError("x")) == 1  # a bad sample found during the work
    assert exit_code(NonFiniteLossError("x")) == 3
    with pytest.raises(CheckpointError) as info:
        with before_work():
            raise CheckpointError("ckpt.pt: not a checkpoint")
    assert exit_code(info.value) == 2  # the same error found before any work
    assert isinstance(info.value, RuntimeError)  # library callers still catch what they caught


def test_the_decorated_main_prints_one_line(capsys, monkeypatch):
    @command("upernet x")
    def main(argv):
        if argv == ["setup"]:
            with before_work():
                raise ValueError("--config: bad")
        if argv == ["bug"]:
            raise AttributeError("'NoneType' object has no attribute 'shape'")
        raise RuntimeError("first line\nsecond line")

    assert main(["setup"]) == 2
    assert capsys.readouterr().err == "upernet x: error: --config: bad\n"
    assert main(["work"]) == 1
    assert capsys.readouterr().err == "upernet x: error: first line (...)\n"
    assert main(["bug"]) == 1  # a bug: still one line, said to be one, with how to see more
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "UPERNET_TRACEBACK=1" in err
    monkeypatch.setenv("UPERNET_TRACEBACK", "1")
    with pytest.raises(AttributeError):
        main(["bug"])
    # under torchrun, rank > 0 leaves set-up errors to rank 0 and prefixes its own
    monkeypatch.delenv("UPERNET_TRACEBACK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["setup"]) == 2 and capsys.readouterr().err == ""
    assert main(["work"]) == 1
    assert capsys.readouterr().err == "upernet x: error: rank 1 of 2: first line (...)\n"

    @command("upernet x")
    def peer_died(argv):  # what gloo raises on a survivor when another process died
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:63646")

    assert peer_died([]) == 1
    assert capsys.readouterr().err == ("upernet x: error: rank 1 of 2: stopped because another "
                                       "process failed (its error is above)\n")


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path):
    assert check_writable_folder(tmp_path / "new" / "sub", "--out").is_dir()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="file.txt"):
        check_writable_folder(blocker, "--out")
    with pytest.raises(UsageError, match="cannot write there"):
        check_writable_folder(blocker / "sub", "--out")


def test_result_files_are_written_whole_or_not_at_all(tmp_path):
    from upernet_ref.files import atomic_write, write_text
    path = write_text(tmp_path / "r.json", "{}")
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of writing the new content
        atomic_write(path, lambda tmp: (tmp.write_text('{"half'), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
