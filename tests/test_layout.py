"""The package's layout, read from its source (issue 18): the reading core never imports the
shell, no import cycle, every function short enough to hold in mind, the core under its cap,
and ruff clean.

The READING CORE is the recipe: `model/`, `configs.py`, `data/`, `training/`, `evaluation/`,
`collectives.py`, `errors.py`. The SHELL is everything around it: `cli/`, `hub.py`,
`checkpoints.py`, `perf/`, `course.py`, `runs.py`, `demo_scenes.py`, `hf_datasets.py`,
`sources.py`, `config_files.py`, `reports.py`, `prepare.py`, `predictions.py`, `files.py`. `upernet_ref/__init__.py` is the front door over both.
"""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "upernet_ref"
CORE = ("model", "configs", "data", "training", "evaluation", "collectives", "errors")
CORE_LINE_CAP = 2000
FUNCTION_LINE_CAP = 80
# Functions over the cap that their owners are rewriting now (issue 18's other items; named
# in the lead's report). The test fails for any other long function, and fails when one of
# these is short again, so that it leaves this list.
# Code lines over the cap: 0 since the core came under it (1,999 code lines at the time). The
# test fails above CORE_LINE_CAP + CORE_LINES_OVER_CAP, and when the core is under CORE_LINE_CAP
# while this is not 0.
CORE_LINES_OVER_CAP = 0
LONG_FUNCTIONS_BEING_SPLIT: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_core(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in CORE


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """Imports under `if typing.TYPE_CHECKING:` (annotations only: never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(ast.walk(child))
    return skipped


def imports_of(module: str) -> dict[str, int]:
    """{project module imported: line} for every import in `module`, inside functions too."""
    tree = ast.parse(MODULES[module].read_text())
    skipped = _type_checking_only(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if node in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from upernet_ref import configs` imports a module; `from x import f` imports x
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                     else node.module for alias in node.names]
        for name in names:
            if name.split(".")[0] == "upernet_ref" and name in MODULES and name != module:
                found.setdefault(name, node.lineno)
    return found


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not comments, not docstrings."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def function_code_lines(source: str, node: ast.AST) -> int:
    """The code lines of one function (its docstring, comments and blank lines not counted)."""
    segment = "\n".join(source.splitlines()[node.lineno - 1:node.end_lineno])
    body = node.body
    doc = (body[0].end_lineno - body[0].lineno + 1 if body and isinstance(body[0], ast.Expr)
           and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
           else 0)
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(segment)).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines) - doc


def test_the_line_counter_counts_code_only(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Doc\nstring."""\n# a comment\n\nx = (1,\n     2)\n\n\ndef f():\n'
                    '    """Its doc."""\n    return x  # why\n')
    assert code_lines(path) == 4  # x = (1, / 2) / def f(): / return x


def test_the_core_never_imports_the_shell():
    offences = [f"{m} imports {target} (line {line})" for m in MODULES if is_core(m)
                for target, line in imports_of(m).items() if not is_core(target)]
    assert not offences, "\n".join(offences)


def test_no_import_cycle_in_the_package():
    graph = {m: set(imports_of(m)) for m in MODULES}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for target in sorted(graph[m]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_function_is_longer_than_80_code_lines():
    lengths = {}
    for m, path in MODULES.items():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{m}.{node.name}"] = function_code_lines(source, node)
    long = {name: n for name, n in lengths.items() if n > FUNCTION_LINE_CAP}
    new = [f"{name}: {n} code lines" for name, n in long.items()
           if name not in LONG_FUNCTIONS_BEING_SPLIT]
    assert not new, "\n".join(new)
    done = [name for name in LONG_FUNCTIONS_BEING_SPLIT if name not in long]
    assert not done, f"now at most {FUNCTION_LINE_CAP} code lines: take out of the list: {done}"


def test_the_reading_core_is_under_2000_code_lines():
    counts = {m: code_lines(p) for m, p in MODULES.items() if is_core(m)}
    assert set(counts) >= {"upernet_ref.model.upernet", "upernet_ref.training.trainer",
                           "upernet_ref.configs", "upernet_ref.evaluation.evaluate"}
    total = sum(counts.values())
    biggest = ", ".join(f"{m} {n}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
    assert total <= CORE_LINE_CAP + CORE_LINES_OVER_CAP, (
        f"the core has {total} code lines, over {CORE_LINE_CAP} (largest: {biggest})")
    assert not CORE_LINES_OVER_CAP or total > CORE_LINE_CAP, (
        f"the core is back under the cap ({total}): set CORE_LINES_OVER_CAP = 0")


def test_ruff_finds_nothing_in_the_package():
    """ruff with the rule set of pyproject.toml ([tool.ruff]); ruff is a dev dependency."""
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed: pip install -e .[dev] (it is a dev dependency)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(PACKAGE)],
                          cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
