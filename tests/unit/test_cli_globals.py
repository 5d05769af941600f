"""Global options before or after the command (issue 16): ``serve --data DIR``, ``show X --repo URL``,
``token create --data DIR`` work as restic's, rbd's and kubectl's do; environment variables keep
working; one given in both places takes the later one (after the command); ``--help`` says which
options are global. Plus click's shell completion, which sees them too."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from blockprov.cli import cli
from blockprov.cli._globals import GLOBAL_HEADING, GLOBAL_NAMES
from tests.conftest import make_image, run_cli
from tests.procs import VENV_BIN


def every_command() -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, (*path, name))
    for name, sub in sorted(cli.commands.items()):
        walk(sub, (name,))
    return out


def test_every_command_and_subgroup_takes_the_global_options() -> None:
    runner = CliRunner()
    for path, cmd in every_command():
        with click.Context(cmd) as ctx:
            names = {p.name for p in cmd.get_params(ctx)}
        assert names >= GLOBAL_NAMES, path
        assert not GLOBAL_NAMES & {p.name for p in cmd.params}, path  # the command's own stay its own
        out = runner.invoke(cli, [*path, "--help"]).output
        assert f"{GLOBAL_HEADING}:" in out and "--data DIR" in out.split(GLOBAL_HEADING)[1], path
    top = runner.invoke(cli, ["--help"]).output
    assert "--repo URL" in top.split(GLOBAL_HEADING)[1].split("Commands:")[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    run_cli("import", str(make_image(tmp_path / "d.img", 256 << 10, seed=160)), "img:v1", data=d)
    return d


def images(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKPROV_")} | (env or {})
    return subprocess.run([str(VENV_BIN / "blockprov"), *args], capture_output=True, text=True, env=e, timeout=60)


def names(p: subprocess.CompletedProcess[str]) -> list[str]:
    assert p.returncode == 0, p.stderr
    return [i["name"] for i in json.loads(p.stdout)]


def test_after_the_command(data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    run_cli("token", "create", "--scope", "read", "--data", str(empty))  # token create --data DIR makes it
    assert (empty / "catalog.sqlite").exists()
    assert names(images("images", "--json", "--data", str(data))) == ["img"]
    assert names(images("images", "--data", str(empty), "--json")) == []
    listed = images("token", "--data", str(empty), "list", "--json")  # after a subgroup too
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1, listed.stderr
    # the environment still counts; a value typed after the command wins over it and over one before
    assert names(images("images", "--json", env={"BLOCKPROV_DATA": str(data)})) == ["img"]
    assert names(images("images", "--json", "--data", str(empty), env={"BLOCKPROV_DATA": str(data)})) == []
    assert names(images("--data", str(empty), "images", "--json", "--data", str(data))) == ["img"]
    assert names(images("--data", str(data), "images", "--json", "--data", str(empty))) == []


def test_after_the_command_errors(data: Path) -> None:
    p = images("show", "img:v1", "--repo", "http://127.0.0.1:1", "--data", str(data))
    assert p.returncode == 7 and "127.0.0.1:1" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    p = images("images", "--s3-timeout", "0")
    assert p.returncode == 2 and "--s3-timeout" in p.stderr, p.stderr
    p = images("images", "--data")
    assert p.returncode == 2 and "requires an argument" in p.stderr, p.stderr


def test_a_global_option_typed_for_the_other_kind_of_repository_is_refused(data: Path) -> None:
    """Issue 27: ``--token`` on the embedded repository and ``--store`` with ``--repo`` were ignored.
    Typed, before or after the command, they are refused (exit 2, naming them); from the environment,
    which serves every command, they are not."""
    env = {"BLOCKPROV_TOKEN": "t", "BLOCKPROV_CA": "/nowhere.pem", "BLOCKPROV_S3_REGION": "eu"}
    assert names(images("images", "--json", "--data", str(data), env=env)) == ["img"]
    for args, said in ((("--token", "t", "images", "--data", str(data)), "--token does nothing here"),
                       (("images", "--data", str(data), "--s3-region", "eu"), "--s3-region does nothing here"),
                       (("--store", "local", "images", "--repo", "http://127.0.0.1:1"), "--store does nothing here")):
        p = images(*args)
        assert p.returncode == 2 and said in p.stderr and len(p.stderr.splitlines()) == 1, (args, p.stderr)
    p = images("images", "--repo", "http://127.0.0.1:1", env={"BLOCKPROV_STORE": "s3://b/p"})
    assert p.returncode == 7 and "127.0.0.1:1" in p.stderr, p.stderr  # unreachable: the store was not refused


def test_serve_data_after_the_command(data: Path) -> None:
    """The repository issue's ``blockprov serve --data DIR``: a busy port is reached only once the
    data directory was taken from after the command (a missing one would be created; see above)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = images("serve", "--data", str(data), "--listen", f"127.0.0.1:{port}")
    assert p.returncode == 2 and "in use" in p.stderr, p.stderr


def test_shell_completion() -> None:
    """click's own completion: the script, and completion of a global option after a command."""
    blockprov = str(VENV_BIN / "blockprov")
    p = subprocess.run([blockprov], env=os.environ | {"_BLOCKPROV_COMPLETE": "bash_source"}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "_blockprov_completion" in p.stdout and "complete " in p.stdout, p.stderr
    env = os.environ | {"_BLOCKPROV_COMPLETE": "bash_complete", "COMP_WORDS": "blockprov serve --da",
                        "COMP_CWORD": "2"}
    p = subprocess.run([blockprov], env=env, capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["plain,--data"], p.stdout
    env |= {"COMP_WORDS": "blockprov attach --da"}
    p = subprocess.run([blockprov], env=env, capture_output=True, text=True, timeout=60)
    assert {"plain,--data", "plain,--data-file"} <= set(p.stdout.split()), p.stdout


# Commands whose --json reports what they did or where they serve (docs/operations.md says so in one
# sentence); every other command with --json is a read command and has a row in the table there.
NOT_READS = {"attach", "boot-files build", "boot-files set", "catalog copy", "clone", "clones serve", "export", "gc",
             "host assign", "host prewarm", "host reprovision", "hydrate", "import", "pool acquire", "pool create",
             "pool release", "pool serve",
             "profile prepare", "profile record", "profile save", "reset", "site add", "snapshot", "store copy",
             "store reindex",
             "token create", "token revoke", "update", "vm clone", "vm push", "vm rm", "vm run",
             "vm stop", "vm template"}


def test_every_read_commands_json_is_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    table = text.split("| command | `--json` prints |")[1].split("\n\n")[0]
    documented = {re.sub(r" [A-Z].*| --.*", "", row.split("`")[1]) for row in table.splitlines()[2:]}
    with_json = {" ".join(path) for path, cmd in every_command()
                 if not isinstance(cmd, click.Group) and any(p.name == "as_json" for p in cmd.params)}
    assert documented <= with_json  # no row for a command without --json
    assert with_json - NOT_READS == documented, "a read command's --json is missing from docs/operations.md"
