"""The ``blockprov`` command line. Errors from anywhere are mapped to messages and exit codes here.

The repository comes from ``--repo URL`` / ``BLOCKPROV_REPO`` (a ``blockprov serve`` endpoint),
else the embedded local repository in ``--data DIR`` / ``BLOCKPROV_DATA`` / the user data directory.
Read commands take ``--json`` for scripts; humans get progress bars on a terminal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from blockprov import __version__
from blockprov.cli import admin, attach, clones, hosts, images, instance, serve, sites, tokens, vm
from blockprov.cli._common import JSON_META, Ctx, quiet_retry_logs
from blockprov.cli._globals import GLOBAL_NAMES, adopt, format_sections, global_options
from blockprov.errors import BlockprovError, CannotWrite, InternalError, NoSpace, UsageError, error_to_dict
from blockprov.store.factory import StoreOptions

# The exit codes of this edge itself; every other one is an ``exit_code`` in errors.py (README's
# table lists them all: tests/unit/test_exit_codes.py). 2 is also click's, for a bad command line.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `ls | head` when head stops reading

# OSErrors that are the user's environment, not a bug: a path that cannot be created or written.
# They end as CannotWrite (one line, exit 13) wherever they were raised, so a new command that meets
# one is covered without its own except clause (issue 17: "fix them as classes").
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                         errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})


NO_ARGS_IS_HELP: tuple[type[click.ClickException], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if isinstance(c, type))


def as_error(e: OSError) -> BlockprovError | None:
    """The error an OSError from the environment is (a full disk, a busy port, an unusable path);
    None for one that is a bug (it stays "internal error", exit 70)."""
    where = e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(msg=str(where) if where is not None else (e.strerror or str(e)))
    if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return UsageError(f"cannot listen: {e.strerror or e}")
    if where is not None and e.errno in PATH_ERRNOS:
        return CannotWrite(path=str(where), why=e.strerror or str(e))
    return None


def _json_wanted() -> bool:
    """--json was given: its callback set the flag, or (a command line click could not parse, so no
    callback ran) it is on the command line."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(JSON_META)) or "--json" in sys.argv[1:]


def _decided() -> None:
    """The command's ending is decided: a Ctrl-C from here on would add a second ending (an error's
    line, then "interrupted" from the exit's unwinding), so SIGINT is ignored for what is left: the
    message, the exit and the context's bounded close."""
    with contextlib.suppress(ValueError):  # not the main thread (the edge called in-process): no guard
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def fail(err: BlockprovError) -> NoReturn:
    """One line on stderr (a JSON object under --json: ``errors.error_to_dict``), then the error's code."""
    _decided()
    if _json_wanted():
        click.echo(json.dumps(error_to_dict(err), sort_keys=True), err=True)
        sys.exit(err.exit_code)
    click.echo(f"blockprov: error: {err}", err=True)
    missing = getattr(err, "missing", None)
    if missing:
        for cid in missing[:10]:
            click.echo(f"  missing chunk {cid}", err=True)
        if len(missing) > 10:
            click.echo(f"  … and {len(missing) - 10} more", err=True)
    sys.exit(err.exit_code)


def _output_closed() -> NoReturn:
    """The reader of stdout went away (`| head`): stop quietly, as `ls` does. stdout is pointed at
    /dev/null first, so the interpreter's final flush does not complain about the pipe again."""
    _decided()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_BROKEN_PIPE)


class Group(click.Group):
    """The top-level group: every command added to it takes the global options after its name too
    (cli/_globals.py), and its help says which options are global."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        adopt(cmd)
        super().add_command(cmd, name)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = self.get_params(ctx)
        format_sections(ctx, formatter, [p for p in params if p.name not in GLOBAL_NAMES],
                        [p for p in params if p.name in GLOBAL_NAMES])
        self.format_commands(ctx, formatter)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        """The top-level command line's errors (``blockprov --bogus``) are parsed here, before invoke."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            _bad_command_line(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BlockprovError as e:
            fail(e)
        except KeyboardInterrupt as e:
            _interrupted(str(e))
        except BrokenPipeError:
            _output_closed()
        except click.ClickException as e:
            _bad_command_line(e)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except OSError as e:
            known = as_error(e)
            if known is None:
                _internal(e)
            fail(known)
        except Exception as e:
            _internal(e)


def _interrupted(note: str) -> NoReturn:
    """Ctrl-C: one line, a JSON object under --json like every other ending. ``note``: what the
    interrupted command leaves going on (a command that waits on an agent raises KeyboardInterrupt
    with it: the agent finishes the operation all the same)."""
    _decided()
    message = "interrupted" + (f": {note}" if note else "")
    if _json_wanted():
        click.echo(json.dumps({"error": "Interrupted", "message": message, "details": {},
                               "exit_code": EXIT_INTERRUPTED}, sort_keys=True), err=True)
    else:
        click.echo(f"blockprov: {message}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _bad_command_line(e: click.ClickException) -> NoReturn:
    """click's own errors (a missing argument, a bad value) as one line too, naming the help to read;
    under --json a JSON object like every other error. A group run without its command shows its
    help, as click does."""
    _decided()
    if isinstance(e, NO_ARGS_IS_HELP):
        e.show()
        sys.exit(e.exit_code)
    if _json_wanted():
        body = {"error": "UsageError", "message": e.format_message(), "details": {}, "exit_code": e.exit_code}
        click.echo(json.dumps(body, sort_keys=True), err=True)
        sys.exit(e.exit_code)
    where = getattr(e, "ctx", None)
    hint = f" (see: {where.command_path} --help)" if isinstance(where, click.Context) else ""
    click.echo(f"blockprov: error: {e.format_message()}{hint}", err=True)
    sys.exit(e.exit_code)


def _internal(e: Exception) -> NoReturn:
    """A bug: say so plainly; the traceback only on request."""
    if os.environ.get("BLOCKPROV_DEBUG"):
        raise e
    fail(InternalError(msg=f"{type(e).__name__}: {e} (set BLOCKPROV_DEBUG=1 for a traceback)"))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@click.version_option(__version__, prog_name="blockprov")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, data: str | None, store: str | None, catalog: str | None,
        s3_endpoint: str | None,
        s3_region: str | None, s3_create_bucket: bool, s3_timeout: float, token: str | None,
        ca: str | None) -> None:
    """Provision machines and VMs from golden disk images at block level.

    The global options may also follow the command (blockprov serve --data DIR); one given in both
    places takes the value given after the command (the later one on the line).
    """
    quiet_retry_logs()
    ctx.obj = Ctx(repo, data, store, StoreOptions(endpoint=s3_endpoint, region=s3_region,
                                                  create_bucket=s3_create_bucket, timeout=s3_timeout))
    ctx.obj.token, ctx.obj.ca, ctx.obj.catalog = token or None, ca or None, catalog or None
    ctx.obj.typed = {n for n in GLOBAL_NAMES if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE}
    ctx.call_on_close(ctx.obj.close)


for _module in (images, serve, attach, instance, clones, hosts, sites, tokens, admin, vm):
    _module.register(cli)


def main() -> None:
    """The command line, with click's own Ctrl-C ending ("Aborted!", exit 1, plain text under --json)
    replaced by the edge's: a Ctrl-C while the command line is read or as the command's context
    closes ends like one during the command."""
    try:
        rv = cli.main(prog_name="blockprov", standalone_mode=False)
    except (click.Abort, KeyboardInterrupt):
        _interrupted("")
    except click.ClickException as e:
        _bad_command_line(e)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
