"""README's exit-code table and the code agree, both ways.

Every exit code the CLI can end with is either an ``exit_code`` of a class in errors.py or one of
the CLI edge's own (cli/__init__.py: 130 interrupted, 141 output closed; click's 2 for a bad command line and 1 for an
abort). The README lists each of them once, and nothing else: a code added to errors.py without a
README row, or a row left behind by a removed code, fails here. The table is the one whose header
starts with ``exit code``.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import click

from blockprov import cli, errors

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\|\s*(\d+)\s*\|")


def readme_codes(text: str) -> dict[int, str]:
    """The rows of the first Markdown table headed ``| exit code | …``: code → meaning."""
    rows: dict[int, str] = {}
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if re.match(r"^\|\s*exit code\s*\|", line, re.IGNORECASE):
            for row in lines[k + 2:]:
                m = ROW.match(row)
                if not m:
                    break
                code = int(m.group(1))
                assert code not in rows, f"README lists exit code {code} twice"
                rows[code] = row.split("|")[2].strip()
            return rows
    raise AssertionError("README.md has no table headed '| exit code | meaning |'")


def code_codes() -> dict[int, list[str]]:
    """Every exit code the code can end with → who ends with it."""
    out: dict[int, list[str]] = {}
    for name, cls in vars(errors).items():
        if inspect.isclass(cls) and issubclass(cls, errors.BlockprovError):
            out.setdefault(cls.exit_code, []).append(name)
    edge = {cli.EXIT_INTERRUPTED: "cli: interrupted", cli.EXIT_BROKEN_PIPE: "cli: output closed",
            click.UsageError.exit_code: "click: bad command line",
            click.ClickException.exit_code: "click: aborted"}
    for code, who in edge.items():
        out.setdefault(code, []).append(who)
    return out


def test_readme_lists_every_exit_code_and_only_those() -> None:
    listed = readme_codes((ROOT / "README.md").read_text())
    used = code_codes()
    missing = {c: used[c] for c in sorted(set(used) - set(listed))}
    stale = {c: listed[c] for c in sorted(set(listed) - set(used))}
    assert not missing, f"exit codes without a README row: {missing}"
    assert not stale, f"README rows for exit codes nothing uses: {stale}"


def test_the_table_reader() -> None:
    text = "intro\n\n| Exit code | meaning |\n|---|---|\n| 2 | usage |\n| 70 | internal error |\n\nmore\n| 9 | x |\n"
    assert readme_codes(text) == {2: "usage", 70: "internal error"}


def test_no_exit_code_outside_the_edge() -> None:
    """A command ends by raising an error (its class carries the code), never ``sys.exit(N)``:
    the one place mapping errors to codes is the CLI group's edge, which names its codes."""
    found = []
    for path in sorted((ROOT / "src" / "blockprov").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"sys.exit with a literal code: {found}"


def test_the_entry_point_ends_an_interrupted_start_as_the_edge_does() -> None:
    """blockprov/__main__.py guards the CLI's import against Ctrl-C with the edge's own code."""
    from blockprov import __main__ as entry

    assert entry.EXIT_INTERRUPTED == cli.EXIT_INTERRUPTED
