"""Which repository a command's options name: ``--repo URL[,URL…]`` (a server, or several as one
with failover), else the embedded repository in the data directory (``--data DIR`` /
``BLOCKPROV_DATA``, else the user's data directory), its chunks in ``--store`` and its catalog in
``--catalog``.

In the repository layer, not the CLI's, because more than the CLI opens repositories from these
options: a process started by another one (vm/vms.py's disks agent, ``python -m
blockprov.clones.serve``) opens the one its starter named.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs

from blockprov.errors import RepositoryNotFound, UsageError
from blockprov.repo.base import Repository
from blockprov.store.factory import StoreOptions


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("blockprov"))


def check_data_dir(data_dir: str | Path | None, *, create: bool) -> Path:
    """The data directory a command uses, refused when it cannot be one.

    A file is never a data directory; one named with ``--data``/``BLOCKPROV_DATA`` that does not exist
    is refused unless the command makes repositories (``create``: import, serve, token create): a
    read command that created it would answer "no images" for a typo (issue 17). The default
    directory is created as before: nobody typed it."""
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise RepositoryNotFound(path=str(path), why="it is a file, not a data directory (--data / BLOCKPROV_DATA)")
    if not path.exists() and not create:
        raise RepositoryNotFound(path=str(path), why="the directory does not exist (--data / BLOCKPROV_DATA; "
                                                     "`blockprov import` creates a repository)")
    for parent in path.parents:  # the first existing ancestor must be a directory we can create in
        if parent.exists():
            if not parent.is_dir():
                raise RepositoryNotFound(path=str(path), why=f"{parent} is a file, not a directory")
            break
    return path


def open_repository(repo_url: str | None, data_dir: str | None, store: str | None = None,
                    store_options: StoreOptions | None = None, *, cacheable: bool = False,
                    token: str | None = None, ca: str | None = None, catalog: str | None = None,
                    create: bool = False) -> Repository:
    """``--repo URL[,URL…]`` (several: a FailoverRepository), else the embedded repository in the data
    directory, with its chunks in ``store`` (``--store``: local packs or ``s3://BUCKET/PREFIX``) and its
    catalog in ``catalog`` (``--catalog``: SQLite in the data directory, or ``postgresql://…``).
    ``cacheable``: fetch chunks with per-chunk GETs an HTTP cache can keep (``attach --cacheable-fetch``).
    ``token``/``ca``: the access token sent to servers and the CA their certificates must chain to.
    ``create``: the command may make a new embedded repository (import); others refuse a missing one."""
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
    from blockprov.catalog.db import is_shared, open_database
    from blockprov.repo.local import LocalRepository
    from blockprov.store.factory import open_store

    if catalog not in (None, "", "sqlite") and not is_shared(catalog):
        open_database(catalog, ".")  # a bad --catalog is named first: it is the mistake on the command line
    # With a shared catalog the data directory holds nothing of the repository's: no reason to refuse it.
    data = check_data_dir(data_dir, create=create or is_shared(catalog))

    db = open_database(catalog, data)  # first: a bad --catalog must not leave an S3 client behind
    return LocalRepository(data, store=open_store(store, data, store_options) if store else None, catalog=db)


