"""Shared plumbing of the command groups: the context object (which repository), output
(``emit``, ``json_option``, progress bars), option callbacks and the event-loop runner (the agent's,
re-exported).

Every ``cli/*`` module imports from here and never from ``blockprov.cli`` itself, so any of them
imports on its own; the group and the exit-code edge live in ``cli/__init__.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import platformdirs

from blockprov import humanize as hz
from blockprov.agent import run_async as run_async  # the commands' event loop is the agent's
from blockprov.errors import UsageError
from blockprov.repo.base import Repository
from blockprov.store.factory import StoreOptions


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("blockprov"))


def open_repository(repo_url: str | None, data_dir: str | None, store: str | None = None,
                    store_options: StoreOptions | None = None, *, cacheable: bool = False,
                    token: str | None = None, ca: str | None = None, catalog: str | None = None) -> Repository:
    """``--repo URL[,URL…]`` (several: a FailoverRepository), else the embedded repository in the data
    directory, with its chunks in ``store`` (``--store``: local packs or ``s3://BUCKET/PREFIX``) and its
    catalog in ``catalog`` (``--catalog``: SQLite in the data directory, or ``postgresql://…``).
    ``cacheable``: fetch chunks with per-chunk GETs an HTTP cache can keep (``attach --cacheable-fetch``).
    ``token``/``ca``: the access token sent to servers and the CA their certificates must chain to."""
    if repo_url:
        urls = [u.strip() for u in repo_url.split(",") if u.strip()]
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise UsageError(f"--repo must be http:// or https:// URLs (comma-separated), not {u!r}")
        from blockprov.repo.remote import RemoteRepository

        if len(urls) == 1:
            return RemoteRepository(urls[0], cacheable=cacheable, token=token, ca=ca)
        from blockprov.repo.multi import FailoverRepository

        return FailoverRepository([RemoteRepository(u, cacheable=cacheable, token=token, ca=ca) for u in urls])
    from blockprov.repo.local import LocalRepository
    from blockprov.store.factory import open_store

    data = data_dir or default_data_dir()
    from blockprov.catalog.db import open_database

    db = open_database(catalog, data)  # first: a bad --catalog must not leave an S3 client behind
    return LocalRepository(data, store=open_store(store, data, store_options) if store else None, catalog=db)


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
        self._repo: Repository | None = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = open_repository(self.repo_url, self.data_dir, self.store, self.store_options,
                                         cacheable=self.cacheable, token=self.token, ca=self.ca,
                                         catalog=self.catalog)
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


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr when it is a terminal; a no-op otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar.update


json_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output.")



def size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return hz.parse_size(value)
    except ValueError:
        raise click.BadParameter(f"not a size: {value!r}") from None


def labels_option(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in value:
        if "=" not in item:
            raise click.BadParameter(f"labels are KEY=VALUE, not {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out
