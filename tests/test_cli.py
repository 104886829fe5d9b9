"""The `upernet` entry point: dispatch, usage, `upernet configs`, shared argument types."""
import argparse
import subprocess
import sys

import pytest

from upernet_ref.cli import COMMANDS, main, parse_pair, parse_scales


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_command_module_has_a_main():
    import importlib
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def test_configs_command_prints_the_table_and_a_forward_pass(capsys):
    assert main(["configs", "--forward", "upernet_small_test", "--size", "32x48",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(" yes ") == 12 and " NO " not in out  # parameters equal the spec
    assert "87,906,444" in out and "397.5" in out
    assert "logits (1, 8, 32, 48)" in out


def test_configs_command_rejects_an_unknown_name(capsys):
    with pytest.raises(SystemExit):
        main(["configs", "--forward", "upernet_r52"])
    assert "valid names" in capsys.readouterr().err


def test_argument_types():
    assert parse_pair("512x1024") == (512, 1024) and parse_pair("341") == (341, 341)
    assert parse_scales("0.5,1,1.75") == (0.5, 1.0, 1.75)
    for bad in ("ax3", "0x5", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_pair(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_scales("-1")


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "upernet_ref.cli", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: upernet COMMAND" in result.stdout
