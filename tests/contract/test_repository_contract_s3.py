"""The repository contract suite (test_repository_contract.py), again, with chunks in S3 (SeaweedFS):

* ``s3-local``: ``LocalRepository(data_dir, store=S3ChunkStore(...))`` in-process;
* ``s3-serve``: a real ``blockprov serve`` process with ``BLOCKPROV_STORE=s3://BUCKET/PREFIX``, reached by
  ``RemoteRepository`` over TCP.

Every test of the base module (and its fixtures but ``be``) is taken over as it is, so a test added
there runs here too; only ``test_raw_url`` is re-stated, because a real server's URL is not
``http://testserver``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov.repo.local import LocalRepository
from blockprov.repo.remote import RemoteRepository
from blockprov.store.s3 import S3ChunkStore
from tests.contract import test_repository_contract as base
from tests.procs import Proc, start_server
from tests.s3fixture import SeaweedFS

globals().update({k: v for k, v in vars(base).items()
                  if k != "be" and (k.startswith("test_") or type(v).__name__ == "FixtureFunctionDefinition")})


class S3Backend:
    def __init__(self, kind: str, tmp: Path, sw: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind = kind
        spec = f"s3://{sw.new_bucket()}/repo"
        self.local = LocalRepository(tmp / "repo", store=S3ChunkStore(spec, timeout=10))
        self.server: Proc | None = None
        self.repo: Any
        if kind == "s3-local":
            self.repo = self.local
        else:
            monkeypatch.setenv("BLOCKPROV_STORE", spec)
            self.server, url = start_server(tmp / "repo")
            self.repo = RemoteRepository(url)

    def gc_now(self) -> Any:
        return self.repo.gc(grace=0.0)

    def close(self) -> None:
        if self.server is not None:
            self.repo.close()
            self.server.stop()
        self.local.close()


@pytest.fixture(params=["s3-local", "s3-serve"])
def be(request: pytest.FixtureRequest, tmp_path: Path, seaweed: SeaweedFS, s3_env: dict[str, str],
       monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Backend]:
    b = S3Backend(request.param, tmp_path, seaweed, monkeypatch)
    yield b
    b.close()


def test_raw_url(be: S3Backend) -> None:  # replaces the base one (see the module docstring)
    url = be.repo.raw_url("lab:v1")
    if be.kind == "s3-local":
        assert url is None
    else:
        assert url == f"{be.repo.url}/v1/images/lab/raw/v1"
