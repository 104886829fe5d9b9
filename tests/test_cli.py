"""The `upernet` entry point: dispatch, usage, help texts, `upernet configs`, argument types."""
import argparse
import re
import subprocess
import sys

import pytest

from upernet_ref.cli import COMMANDS, main
from upernet_ref.cli.common import parse_pair, parse_scales, positive_int


def test_usage_lists_every_command_and_export_format(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    export_line = next(line for line in out.splitlines() if line.strip().startswith("export"))
    for fmt in ("ONNX", "torch.export", "safetensors"):
        assert fmt in export_line


def test_bare_upernet_is_an_error_and_version_is_printed():
    """Through the installed entry point's module (`python -m upernet_ref.cli`, what the
    console script runs): a bare `upernet` prints usage on stderr and exits 2; `upernet
    --version` prints the package version and exits 0."""
    import upernet_ref
    def run(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "upernet_ref.cli", *words],
                              capture_output=True, text=True, timeout=120)

    bare = run()
    assert bare.returncode == 2 and bare.stdout == ""
    assert "usage: upernet [--version] COMMAND" in bare.stderr
    version = run("--version")
    assert version.returncode == 0 and version.stdout.split()[-1] == upernet_ref.__version__


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_command_module_has_a_main():
    import importlib
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def help_text(words: list[str], capsys) -> str:
    """What `upernet WORDS --help` prints."""
    with pytest.raises(SystemExit) as exit_:
        main(words + ["--help"])
    assert exit_.value.code == 0, words
    return capsys.readouterr().out


def help_problems(text: str) -> list[str]:
    """A missing description, and every argument listed without help, in one --help output."""
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    problems = []
    # usage, then the description, then the sections ("options:", "positional arguments:")
    if len(blocks) < 2 or re.match(r"[a-z ]+:\n", blocks[1]):
        problems.append("no description")
    for block in blocks:
        lines = block.splitlines()
        if not re.fullmatch(r"(options|positional arguments):", lines[0]):
            continue
        for i, line in enumerate(lines[1:], 1):
            entry = re.fullmatch(r"  (\S+(?: \S+)*)( {2,}\S.*)?", line)  # "  --out OUT  help"
            if entry is None or entry.group(2):
                continue  # a continuation line, or help on the same line
            follows = lines[i + 1] if i + 1 < len(lines) else ""
            if not re.match(r" {3,}\S", follows):  # help on the next line, indented further
                problems.append(f"no help for {entry.group(1)!r}")
    return problems


def test_help_checker_finds_what_is_missing():
    good = ("usage: x [-h] [--out OUT]\n\nDoes x.\n\noptions:\n  -h, --help  show help\n"
            "  --a-very-long-option A_VERY_LONG_OPTION\n                        help below\n"
            "  --out OUT   output\n\nAn epilog.\n")
    assert help_problems(good) == []
    bad = good.replace("Does x.\n\n", "").replace("   output", "")
    assert help_problems(bad) == ["no description", "no help for '--out OUT'"]


def test_every_command_has_a_description_and_help_for_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # stable wrapping
    pending, seen = [[name] for name in COMMANDS], []
    while pending:
        words = pending.pop(0)
        text = help_text(words, capsys)
        seen.append(" ".join(words))
        assert help_problems(text) == [], f"upernet {' '.join(words)} --help:\n{text}"
        for group in re.findall(r"^  \{([\w,-]+)\}$", text, flags=re.M):  # nested subcommands
            pending += [words + [sub] for sub in group.split(",")]
    assert {"data check", "data prepare voc-aug", "data prepare cityscapes"} <= set(seen)


def test_configs_command_prints_the_table_with_the_small_ones_marked_and_a_forward_pass(capsys):
    """One table (it counts the MACs of all 14 configurations, seconds of CPU time)."""
    assert main(["configs", "--forward", "upernet_small_test", "--size", "32x48",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(" yes ") == 12 and " NO " not in out  # parameters equal the spec
    assert "87,906,444" in out and "397.5" in out
    assert "logits (1, 8, 32, 48)" in out
    for name in ("upernet_small_demo *", "upernet_small_test *", "upernet_r50_os8_ade20k "):
        assert name in out
    assert "* small configuration" in out


def test_configs_command_rejects_an_unknown_name_before_the_table(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["configs", "--forward", "upernet_r52"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert "valid names" in err and out == ""


def test_argument_types():
    assert parse_pair("512x1024") == (512, 1024) and parse_pair("341") == (341, 341)
    assert parse_scales("0.5,1,1.75") == (0.5, 1.0, 1.75)
    for bad in ("ax3", "0x5", "1x2x3", "256x", "x256", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_pair(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_scales("-1")
    assert positive_int("3") == 3
    for bad in ("0", "-2", "1.5", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)


def test_a_terminal_without_width_gets_plain_log_lines(tmp_path):
    """Under a 0x0 pseudo-terminal (stderr a tty, but no width) tqdm would draw nothing: `upernet
    train` prints its plain log lines instead of a bar."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "upernet_ref.cli", "train", "--config",
                             "upernet_small_test", "--max-iters", "2", "--no-val", "--out",
                             str(tmp_path / "run")], stdin=follower, stdout=follower,
                            stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert re.search(r"iter\s*2\b", text), text[-2000:]  # the log line of the last iteration
    assert "\r" not in text.replace("\r\n", "\n")  # no bar redrawing itself
