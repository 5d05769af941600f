"""Shared plumbing of the command groups: the context object (which repository), output
(``emit``, ``json_option``, progress bars), option callbacks and the event-loop runner (the agent's,
re-exported).

Every ``cli/*`` module imports from here and never from ``blockprov.cli`` itself, so any of them
imports on its own; the group and the exit-code edge live in ``cli/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from blockprov import humanize as hz
from blockprov.agent import run_async as run_async  # the commands' event loop is the agent's
from blockprov.errors import CannotWrite, UsageError
from blockprov.repo.base import Repository
from blockprov.repo.opening import check_data_dir as check_data_dir
from blockprov.repo.opening import default_data_dir as default_data_dir
from blockprov.repo.opening import open_repository as open_repository
from blockprov.results import to_dict
from blockprov.store.factory import StoreOptions


def check_creatable(path: Path, what: str) -> Path:
    """``path`` (a socket, an output file) can be created: its nearest existing ancestor is a
    directory. Checked before a server starts, so the mistake is one line, not a half-started agent."""
    if path.is_dir():
        raise CannotWrite(path=str(path), why=f"it is a directory, not a {what}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CannotWrite(path=str(path), why=f"{parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise CannotWrite(path=str(path), why=f"{parent} is not writable (read-only file system?)")
            break
    return path


RETRY_LOGGER = "blockprov.retry"


def quiet_retry_logs() -> None:
    """A one-shot command says its own outcome in one line: the retry helper's "failed (attempt N…);
    retrying" lines (retry.py: warnings from the fifth attempt) would come before it on stderr, one
    per attempt of every request (issue 27: an import whose S3 server died printed 63 lines). The
    group does this for every command; servers (``server_logs``) keep them."""
    import logging

    logging.getLogger(RETRY_LOGGER).setLevel(logging.ERROR)


def server_logs() -> None:
    """A server (serve, attach, clones serve, pool serve) logs what it retries: its log is where an
    operator looks for an outage it rides out."""
    import logging

    logging.getLogger(RETRY_LOGGER).setLevel(logging.NOTSET)


def quiet_library_logs() -> None:
    """A command that opens a cache here reports its own outcome: the cache's and fetcher's log
    lines (meant for an agent's log: "fetching chunks … failed", "hydration paused") would repeat
    its one error line. Servers (serve, attach, clones/pool serve) keep their logs."""
    import logging

    logging.getLogger("blockprov").setLevel(logging.CRITICAL)


@contextmanager
def listening(*addresses: str | None) -> Iterator[None]:
    """Turn a failed bind (address in use, not this host's) into one line naming the address."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        shown = " or ".join(dict.fromkeys(a for a in addresses if a)) or "the address"
        raise UsageError(f"cannot listen on {shown}: {os.strerror(e.errno).lower()}") from None


def activated_sockets(*given: object) -> list[socket.socket]:
    """The listening sockets of systemd socket activation (LISTEN_FDS, nbd/activation.py) for an NBD
    server command, checked against its own listeners ``given`` (--socket, --listen): one of the two.
    As qemu-nbd does, a listener on the command line of an activated server is refused: the unit
    that passes sockets and the option that names another are two ideas of where it serves."""
    from blockprov.nbd.activation import listen_sockets

    activated = listen_sockets()
    if activated and any(g is not None for g in given):
        raise UsageError("started by socket activation (LISTEN_FDS): it serves the sockets it was given; "
                         "drop --socket and --listen")
    if not activated and all(g is None for g in given):
        raise UsageError("give --socket PATH or --listen HOST:PORT (or both), or start it by socket activation")
    return activated


# Global options a repository uses only in one of its forms (the rules of ``Ctx.check_globals``)
EMBEDDED_ONLY = ("store", "catalog", "s3_endpoint", "s3_region", "s3_create_bucket", "s3_timeout")
S3_ONLY = ("s3_endpoint", "s3_region", "s3_create_bucket", "s3_timeout")
SERVER_ONLY = ("token", "ca")


def nothing_here(given: list[str], why: str) -> None:
    """The one refusal of options typed where they would do nothing (issue 27: accepted, then ignored)."""
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing here: {why}")


def refuse_own_options(names: tuple[str, ...], why: str) -> None:
    """Those of the running command's own options ``names`` (parameter names) typed on its command
    line do nothing in the form it was given: refused, naming them as typed."""
    ctx = click.get_current_context()
    nothing_here([p.opts[0] for p in ctx.command.params
                  if p.name in names and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE], why)


class Ctx:
    def __init__(self, repo_url: str | None, data_dir: str | None, store: str | None = None,
                 store_options: StoreOptions | None = None) -> None:
        self.repo_url = repo_url
        self.data_dir = data_dir
        self.store = store
        self.store_options = store_options
        self.cacheable = False  # set by attach --cacheable-fetch before the repository is opened
        self.token: str | None = None  # --token / BLOCKPROV_TOKEN
        self.ca: str | None = None  # --ca / BLOCKPROV_CA
        self.catalog: str | None = None  # --catalog / BLOCKPROV_CATALOG
        self.create = False  # set by commands that may make the embedded repository (import)
        self.typed: set[str] = set()  # global options typed on the command line (not from the environment)
        self._repo: Repository | None = None

    def set_global(self, name: str, value: Any) -> None:
        """A global option typed after the command (cli/_globals.py): it replaces the group's value.
        Applied while the command line is parsed, before the repository is opened."""
        assert self._repo is None, "a global option after the repository was opened"
        self.typed.add(name)
        if name.startswith("s3_"):
            field = {"s3_endpoint": "endpoint", "s3_region": "region", "s3_create_bucket": "create_bucket",
                     "s3_timeout": "timeout"}[name]
            self.store_options = dataclasses.replace(self.store_options or StoreOptions(), **{field: value})
            return
        attr = {"repo": "repo_url", "data": "data_dir"}.get(name, name)
        if not hasattr(self, attr):
            raise AttributeError(f"no global option {name!r}")
        setattr(self, attr, value or None)

    def refuse_typed(self, names: tuple[str, ...], why: str) -> None:
        """UsageError naming those of ``names`` typed on the command line, and why they do nothing
        here. Only typed ones: an environment variable serves many commands and may not concern this one."""
        nothing_here(["--" + n.replace("_", "-") for n in names if n in self.typed], why)

    def check_globals(self) -> None:
        """A global option typed for a repository of the other kind is refused, not ignored (issue 27:
        ``--repo URL --store s3://…`` read the server's own store and said nothing, ``--token`` on the
        embedded repository was dropped)."""
        if self.repo_url:
            self.refuse_typed(EMBEDDED_ONLY, f"it is the embedded repository's (--data); --repo {self.repo_url} "
                                             "keeps its chunks and catalog where its server was told to")
            if not any(u.strip().startswith("https://") for u in self.repo_url.split(",")):
                self.refuse_typed(("ca",), f"a CA is trusted for https:// repositories; --repo {self.repo_url} "
                                           "is plain http://")
        else:
            self.refuse_typed(SERVER_ONLY, "a token and a CA are for a repository server (--repo URL); the "
                                           "embedded repository (--data) takes neither")
            if not (self.store or "").startswith("s3://"):
                self.refuse_typed(S3_ONLY, "the S3 options are for an s3:// --store; this repository keeps its "
                                           "chunks in the data directory")

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self.check_globals()
            self._repo = open_repository(self.repo_url, self.data_dir, self.store, self.store_options,
                                         cacheable=self.cacheable, token=self.token, ca=self.ca,
                                         catalog=self.catalog, create=self.create)
        return self._repo

    def repository_for(self, cache_dir: Path) -> Repository:
        """The repository of an offline operation on ``cache_dir`` (agent/offline.py chooses it)."""
        from blockprov.agent.offline import repository_of

        url, data = repository_of(cache_dir, self.repo_url, self.data_dir)
        if (url, data) == (self.repo_url, self.data_dir):
            return self.repo
        return open_repository(url, data, cacheable=self.cacheable, token=self.token, ca=self.ca)

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()


def refuse_closed_output() -> None:
    """For a command whose result exists only in what it prints (a token's secret, a VM started in
    the background): when stdout is a pipe or socket whose reader is
    already gone, end as a closed output ends (exit 141, quietly) before anything is made — `token
    create | …` whose reader had gone turned access control on with a token nobody could read, and
    `vm run` left a VM and its disks agent (issue 27). A reader that goes away later is the usual
    closed pipe: what was made stays, as `vm list` shows."""
    import select
    import stat

    try:
        fd = sys.stdout.fileno()
        if not (stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)):
            return
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return
    if gone:
        raise BrokenPipeError(errno.EPIPE, "the reader of stdout is gone")


def emit(data: Any) -> None:
    """``--json``: a command's result (a typed one made a dict here, at the edge: results.py)."""
    click.echo(json.dumps(to_dict(data), indent=2, sort_keys=True, default=str))


class Bar:
    """A byte progress bar on stderr: percentage, binary units (MiB, as the summaries say) and ETA
    once the total is known; a counter and a rate before. Thread-safe (the importer's workers
    report from their threads); redrawn at most ten times a second."""

    def __init__(self, total: int | None, desc: str, unit: str = "B") -> None:
        self.total, self.desc, self.done, self.unit = total, desc, 0, unit
        self._t0 = self._drawn = time.monotonic()
        self._lock = threading.Lock()

    def set_total(self, total: int) -> None:
        self.total = total

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._drawn >= 0.1:
                self._drawn = now
                self._draw(now)

    def _fmt(self, n: float) -> str:
        return hz.size(n) if self.unit == "B" else f"{n:.0f} {self.unit}" if n == int(n) else f"{n:.1f} {self.unit}"

    def line(self, now: float) -> str:
        elapsed = max(now - self._t0, 1e-6)
        rate = self.done / elapsed
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 20)
            eta = (self.total - self.done) / rate if rate > 0 else None
            return (f"{self.desc}: {100 * frac:5.1f}% [{bar:20}] {self._fmt(self.done)} / {self._fmt(self.total)}  "
                    f"{self._fmt(rate)}/s  ETA {_clock(eta)}")
        return f"{self.desc}: {self._fmt(self.done)}  {self._fmt(rate)}/s"

    def _draw(self, now: float) -> None:
        sys.stderr.write("\r" + self.line(now)[:119].ljust(119))
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 119 + "\r")
        sys.stderr.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class _Quiet:
    """What a bar is when nobody watches (piped, --json): it counts nothing and draws nothing."""

    def set_total(self, total: int) -> None:
        pass

    def __call__(self, n: int) -> None:
        pass


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "B") -> Iterator[Bar | _Quiet]:
    """A byte progress bar on stderr when it is a terminal (and not --json); quiet otherwise, so
    piped output and --json stay clean. Call it with bytes done; ``set_total`` when the size is
    learned late (import learns it from the source). ``unit``: bytes (binary units), else a count
    of things (``"instances"``)."""
    if not enabled or not sys.stderr.isatty():
        yield _Quiet()
        return
    bar = Bar(total, desc, unit)
    try:
        yield bar
    finally:
        bar.close()


JSON_META = "blockprov.json"  # ctx.meta flag: --json was given, so errors are JSON too (cli/__init__.py)


def _json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META] = True
    return value


json_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--json", "as_json", is_flag=True, is_eager=True, callback=_json_flag,
    help="Machine-readable output (errors too: one JSON object on stderr).")



def size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return hz.parse_size(value)
    except ValueError:
        raise click.BadParameter(f"not a size: {value!r}") from None


def memory_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Every ``--memory`` (guest RAM): a plain number is MiB, as qemu's ``-m`` (humanize.parse_memory)."""
    if value is None:
        return None
    try:
        return hz.parse_memory(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


MEMORY_HELP = "a plain number is MiB, as qemu's -m; or with a unit: 512M, 2G"


def labels_option(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    """``--label KEY=VALUE``, repeatable. A key given twice with two values is refused (issue 27:
    the first was dropped without a word), and so is an empty key."""
    out: dict[str, str] = {}
    for item in value:
        if "=" not in item:
            raise click.BadParameter(f"labels are KEY=VALUE, not {item!r}")
        k, v = item.split("=", 1)
        if not k:
            raise click.BadParameter(f"a label needs a key: {item!r}")
        if out.get(k, v) != v:
            raise click.BadParameter(f"label {k!r} is given twice, as {out[k]!r} and {v!r}: which one?")
        out[k] = v
    return out
