"""The ``blockprov`` command line. Errors from anywhere are mapped to messages and exit codes here.

The repository comes from ``--repo URL`` / ``BLOCKPROV_REPO`` (a ``blockprov serve`` endpoint),
else the embedded local repository in ``--data DIR`` / ``BLOCKPROV_DATA`` / the user data directory.
Read commands take ``--json`` for scripts; humans get progress bars on a terminal.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, NoReturn

import click

from blockprov import __version__
from blockprov.cli import admin, attach, clones, hosts, images, instance, serve, tokens
from blockprov.cli._common import JSON_META, Ctx
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


def fail(err: BlockprovError) -> NoReturn:
    """One line on stderr (a JSON object under --json: ``errors.error_to_dict``), then the error's code."""
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
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_BROKEN_PIPE)


class Group(click.Group):
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
        except KeyboardInterrupt:
            click.echo("blockprov: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
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


def _bad_command_line(e: click.ClickException) -> NoReturn:
    """click's own errors (a missing argument, a bad value) as one line too, naming the help to read;
    under --json a JSON object like every other error. A group run without its command shows its
    help, as click does."""
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
@click.option("--repo", envvar="BLOCKPROV_REPO", metavar="URL",
              help="Repository server URL (env BLOCKPROV_REPO); default: the embedded local repository.")
@click.option("--data", envvar="BLOCKPROV_DATA", metavar="DIR",
              help="Data directory of the embedded repository (env BLOCKPROV_DATA).")
@click.option("--store", envvar="BLOCKPROV_STORE", metavar="local|s3://BUCKET/PREFIX",
              help="Where the embedded repository (and serve) keeps chunks (env BLOCKPROV_STORE); "
                   "default: packs in the data directory.")
@click.option("--catalog", envvar="BLOCKPROV_CATALOG", metavar="sqlite|postgresql://…",
              help="Where the embedded repository keeps its catalog (env BLOCKPROV_CATALOG); default: SQLite in "
                   "the data directory. A PostgreSQL URL lets several servers on several hosts share one catalog "
                   "(with one --store bucket).")
@click.option("--s3-endpoint", envvar="BLOCKPROV_S3_ENDPOINT", metavar="URL",
              help="S3 endpoint (default: AWS_ENDPOINT_URL, ~/.aws/config, else AWS).")
@click.option("--s3-region", envvar="BLOCKPROV_S3_REGION", metavar="REGION",
              help="S3 region (default: AWS_REGION, ~/.aws/config, else us-east-1).")
@click.option("--s3-create-bucket", is_flag=True, help="Create the --store bucket if it does not exist.")
@click.option("--s3-timeout", envvar="BLOCKPROV_S3_TIMEOUT", default=30.0, show_default=True,
              type=click.FloatRange(0.1, 3600), help="Seconds temporary S3 failures are retried.")
@click.option("--token", envvar="BLOCKPROV_TOKEN", metavar="TOKEN",
              help="Access token sent to the repository server (env BLOCKPROV_TOKEN).")
@click.option("--ca", envvar="BLOCKPROV_CA", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Trust only this CA (PEM) for https:// repositories (env BLOCKPROV_CA); default: the system's.")
@click.version_option(__version__, prog_name="blockprov")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, data: str | None, store: str | None, catalog: str | None,
        s3_endpoint: str | None,
        s3_region: str | None, s3_create_bucket: bool, s3_timeout: float, token: str | None,
        ca: str | None) -> None:
    """Provision machines and VMs from golden disk images at block level."""
    ctx.obj = Ctx(repo, data, store, StoreOptions(endpoint=s3_endpoint, region=s3_region,
                                                  create_bucket=s3_create_bucket, timeout=s3_timeout))
    ctx.obj.token, ctx.obj.ca, ctx.obj.catalog = token or None, ca or None, catalog or None
    ctx.call_on_close(ctx.obj.close)


for _module in (images, serve, attach, instance, clones, hosts, tokens, admin):
    _module.register(cli)


def main() -> None:
    cli(prog_name="blockprov")


if __name__ == "__main__":
    main()
