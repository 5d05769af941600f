"""agent/offline.py: an operation on a cache no agent serves, and which repository it uses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from blockprov.agent import lifecycle
from blockprov.agent.offline import on_cache, repository_of
from blockprov.cache import CacheDevice
from blockprov.errors import CacheError
from blockprov.imaging.importer import import_image
from blockprov.repo.base import Repository
from blockprov.repo.local import LocalRepository
from tests.caches import open_cache
from tests.conftest import make_image

CS = 64 << 10


@pytest.fixture
def repo(tmp_path: Path) -> Any:
    r = LocalRepository(tmp_path / "repo")
    import_image(r, make_image(tmp_path / "g.img", 1 << 20, seed=3, pattern_every=CS), "lab:v1")
    yield r
    r.close()


def make_cache(cache: Path, repo: LocalRepository, recorded: str | None) -> None:
    async def main() -> None:
        dev = await open_cache(cache, repo, repo.resolve("lab:v1"))
        if recorded is not None:
            dev.record_repository(recorded)  # as an agent records its repository
        await dev.write(0, b"x" * CS)
        await dev.close()

    asyncio.run(main())


def test_the_repository_of_a_stopped_cache(repo: LocalRepository, tmp_path: Path) -> None:
    remote, local, unknown = tmp_path / "r", tmp_path / "l", tmp_path / "u"
    make_cache(remote, repo, "https://repo.example:8420")
    make_cache(local, repo, "file:///srv/bp")
    make_cache(unknown, repo, None)
    assert repository_of(remote, "http://given:1", None) == ("http://given:1", None)  # --repo wins
    assert repository_of(remote, None, None) == ("https://repo.example:8420", None)
    assert repository_of(remote, None, "/data") == ("https://repo.example:8420", None)
    assert repository_of(local, None, None) == (None, "/srv/bp")
    assert repository_of(local, None, "/data") == (None, "/data")  # --data names the embedded one
    assert repository_of(unknown, None, None) == (None, None)
    assert repository_of(tmp_path / "not-a-cache", None, "/data") == (None, "/data")


def test_on_a_stopped_cache_the_operation_runs_here(repo: LocalRepository, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    make_cache(cache, repo, None)
    asked: list[Path] = []

    def repository(d: Path) -> Repository:
        asked.append(d)
        return repo

    async def reset(dev: CacheDevice, r: Repository) -> lifecycle.ResetResult:
        assert r is repo
        return await lifecycle.reset(dev)

    out = on_cache(cache, "reset", {}, reset, repository, lifecycle.ResetResult)
    assert out.chunks_reset == 1 and asked == [cache.resolve()]


def test_a_directory_that_is_no_cache_is_refused_untouched(tmp_path: Path) -> None:
    def repository(d: Path) -> Repository:
        raise AssertionError("no repository is opened for a directory that is no cache")

    async def never(dev: CacheDevice, r: Repository) -> dict[str, Any]:
        raise AssertionError("not run")

    with pytest.raises(CacheError, match="is not a blockprov cache"):
        on_cache(tmp_path, "reset", {}, never, repository, dict)
    assert list(tmp_path.iterdir()) == []
