"""The global options (which repository, how to reach it), accepted before *or after* the command.

``blockprov --data DIR serve`` and ``blockprov serve --data DIR`` are the same command line, as with
restic, rbd and kubectl, whose users put these options wherever habit puts them (issue 16). The
options are defined once here (``GLOBAL_OPTIONS``); the group takes them with their environment
variables and defaults, and every command and subgroup takes a copy of each without either (so
only what was typed after the command counts there). A value typed after the command is applied to
the context object (``Ctx.set_global``) as it is parsed, eagerly, before the command's own
parameters, and it wins over one typed before the command: the later one on the line wins, as when
any option is repeated (``--data A serve --data B`` uses B).

The copies are added by ``get_params``, not to ``Command.params``: a command's ``params`` stay its
own (the mistakes test walks them), and its ``--help`` lists the copies in their own "Global
options" section. The commands are the plain click commands each ``cli/*`` module makes;
``adopt`` gives them (and the commands of their subgroups) the global options as they are added to
the group, so a new module gets them without knowing about this one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import click
from click.core import ParameterSource

from blockprov.cli._common import Ctx

_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("--repo", {"envvar": "BLOCKPROV_REPO", "metavar": "URL",
                "help": "Repository server URL (env BLOCKPROV_REPO); default: the embedded local repository."}),
    ("--data", {"envvar": "BLOCKPROV_DATA", "metavar": "DIR",
                "help": "Data directory of the embedded repository (env BLOCKPROV_DATA)."}),
    ("--store", {"envvar": "BLOCKPROV_STORE", "metavar": "local|s3://BUCKET/PREFIX",
                 "help": "Where the embedded repository (and serve) keeps chunks (env BLOCKPROV_STORE); "
                         "default: packs in the data directory."}),
    ("--catalog", {"envvar": "BLOCKPROV_CATALOG", "metavar": "sqlite|postgresql://…",
                   "help": "Where the embedded repository keeps its catalog (env BLOCKPROV_CATALOG); default: SQLite "
                           "in the data directory. A PostgreSQL URL lets several servers on several hosts share one "
                           "catalog (with one --store bucket)."}),
    ("--s3-endpoint", {"envvar": "BLOCKPROV_S3_ENDPOINT", "metavar": "URL",
                       "help": "S3 endpoint (default: AWS_ENDPOINT_URL, ~/.aws/config, else AWS)."}),
    ("--s3-region", {"envvar": "BLOCKPROV_S3_REGION", "metavar": "REGION",
                     "help": "S3 region (default: AWS_REGION, ~/.aws/config, else us-east-1)."}),
    ("--s3-create-bucket", {"is_flag": True, "help": "Create the --store bucket if it does not exist."}),
    ("--s3-timeout", {"envvar": "BLOCKPROV_S3_TIMEOUT", "default": 30.0, "show_default": True,
                      "type": click.FloatRange(0.1, 3600), "help": "Seconds temporary S3 failures are retried."}),
    ("--token", {"envvar": "BLOCKPROV_TOKEN", "metavar": "TOKEN",
                 "help": "Access token sent to the repository server (env BLOCKPROV_TOKEN)."}),
    ("--ca", {"envvar": "BLOCKPROV_CA", "metavar": "FILE", "type": click.Path(dir_okay=False, path_type=str),
              "help": "Trust only this CA (PEM) for https:// repositories (env BLOCKPROV_CA); default: the system's."}),
]
GLOBAL_NAMES = frozenset(decl.lstrip("-").replace("-", "_") for decl, _ in _SPECS)
GLOBAL_HEADING = "Global options (before or after the command)"


def global_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The group's global options, with their environment variables and defaults."""
    for decl, kw in reversed(_SPECS):
        f = click.option(decl, **kw)(f)
    return f


def _given_after_the_command(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A global option typed after the command: it replaces the group's value in the context object."""
    if param.name and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
        obj = ctx.find_object(Ctx)
        if obj is not None:  # None while completing a command line: the group's callback has not run
            obj.set_global(param.name, value)
    return value


@cache
def _command_copies() -> tuple[click.Option, ...]:
    """The options every command takes: no environment variable, no default (the group read those)."""
    out = []
    for decl, kw in _SPECS:
        kw = {k: v for k, v in kw.items() if k not in ("envvar", "default", "show_default")}
        out.append(click.Option([decl], expose_value=False, is_eager=True, callback=_given_after_the_command, **kw))
    return tuple(out)


def format_sections(ctx: click.Context, formatter: click.HelpFormatter, own: list[click.Parameter],
                    globals_: list[click.Parameter]) -> None:
    """A command's help: its own options, then the global ones in a section that says so."""
    for heading, params in (("Options", own), (GLOBAL_HEADING, globals_)):
        rows = [r for p in params if (r := p.get_help_record(ctx)) is not None]
        if rows:
            with formatter.section(heading):
                formatter.write_dl(rows)


class TakesGlobals(click.Command):
    """A command that also accepts the global options after its name (a mixin ahead of its class)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return [*super().get_params(ctx), *_command_copies()]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_sections(ctx, formatter, super().get_params(ctx), list(_command_copies()))
        if isinstance(self, click.Group):
            self.format_commands(ctx, formatter)


class TakesGlobalsGroup(TakesGlobals, click.Group):
    """A subgroup (``token``, ``pool``): the global options after its name and after its commands'."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        adopt(cmd)
        super().add_command(cmd, name)


_ADOPTED: dict[type[click.Command], type[click.Command]] = {}


def _adopted(cls: type[click.Command]) -> type[click.Command]:
    if cls not in _ADOPTED:
        base: type[click.Command] = TakesGlobalsGroup if issubclass(cls, click.Group) else TakesGlobals
        _ADOPTED[cls] = type(f"Global{cls.__name__}", (base, cls), {})
    return _ADOPTED[cls]


def adopt(cmd: click.Command) -> None:
    """Give ``cmd`` (and every command under it) the global options. Its class becomes a subclass of
    its own with the mixin in front: the object stays the one its module holds, with its parameters,
    callback and help untouched."""
    if not isinstance(cmd, TakesGlobals):
        clash = GLOBAL_NAMES & {p.name for p in cmd.params}
        if clash:  # a programming error, caught by importing the CLI in any test
            raise TypeError(f"command {cmd.name!r} has its own option named like a global one: {sorted(clash)}")
        cmd.__class__ = _adopted(type(cmd))
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            adopt(sub)
