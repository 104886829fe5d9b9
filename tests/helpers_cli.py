"""Running `upernet` in this process for the bad-input tests: the exit code, the output, and
the check that an error is one line `upernet CMD: error: ...` (README, "Errors and exit codes")."""
from __future__ import annotations

from upernet_ref.cli import main


def run(capfd, argv):
    """`upernet ARGV` -> (exit code, stdout, stderr), never with a traceback."""
    code = main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return code, out, err


def one_line(err: str, command: str, *fragments: str) -> None:
    """`err` is one line `upernet COMMAND: error: ...` holding every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"upernet {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
