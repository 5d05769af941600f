"""The ``blockprov`` command line. Errors from anywhere are mapped to messages and exit codes here.

The repository comes from ``--repo URL`` / ``BLOCKPROV_REPO`` (a ``blockprov serve`` endpoint),
else the embedded local repository in ``--data DIR`` / ``BLOCKPROV_DATA`` / the user data directory.
Read commands take ``--json`` for scripts; humans get progress bars on a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from blockprov import __version__
from blockprov.cli import admin, attach, clones, hosts, images, instance, serve, tokens, vm
from blockprov.cli._common import Ctx
from blockprov.errors import BlockprovError, InternalError
from blockprov.store.factory import StoreOptions

# The exit codes of this edge itself; every other one is an ``exit_code`` in errors.py (README's
# table lists them all: tests/unit/test_exit_codes.py). 2 is also click's, for a bad command line.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def fail(err: BlockprovError) -> NoReturn:
    click.echo(f"blockprov: error: {err}", err=True)
    missing = getattr(err, "missing", None)
    if missing:
        for cid in missing[:10]:
            click.echo(f"  missing chunk {cid}", err=True)
        if len(missing) > 10:
            click.echo(f"  … and {len(missing) - 10} more", err=True)
    sys.exit(err.exit_code)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BlockprovError as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("blockprov: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as e:  # a bug: say so plainly; the traceback only on request
            if os.environ.get("BLOCKPROV_DEBUG"):
                raise
            click.echo(f"blockprov: internal error: {type(e).__name__}: {e} "
                       "(set BLOCKPROV_DEBUG=1 for a traceback)", err=True)
            sys.exit(InternalError.exit_code)


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


for _module in (images, serve, attach, instance, clones, hosts, tokens, admin, vm):
    _module.register(cli)


def main() -> None:
    cli(prog_name="blockprov")


if __name__ == "__main__":
    main()
