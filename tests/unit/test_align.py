"""align.py: chunk runs are half-open everywhere (the cache's journal ranges, the diff command)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from blockprov import codec
from blockprov.align import runs
from blockprov.manifest import build
from blockprov.repo.local import LocalRepository
from tests.conftest import run_cli


def test_runs_are_maximal_and_half_open() -> None:
    assert runs([]) == []
    assert runs([5]) == [(5, 6)]
    assert runs([3, 4, 5, 9]) == [(3, 6), (9, 10)]
    assert runs(iter([0, 2, 4])) == [(0, 1), (2, 3), (4, 5)]  # any iterable, generators included


def test_runs_cover_every_index_once() -> None:
    rnd = random.Random(7)
    for _ in range(200):
        idx = sorted(rnd.sample(range(64), rnd.randint(0, 64)))
        got = runs(idx)
        assert [i for a, b in got for i in range(a, b)] == idx
        assert all(a < b for a, b in got)
        assert all(got[k][1] < got[k + 1][0] for k in range(len(got) - 1))  # maximal: a gap between runs


def test_diff_names_chunk_runs_inclusively(tmp_path: Path) -> None:
    """The diff command's text (inclusive ``a-b`` for people) and JSON (the chunk list) are unchanged."""
    repo = LocalRepository(tmp_path / "data")
    cs = 4096

    def version(changed: set[int]) -> None:
        ids = []
        for c in range(10):
            data = bytes([c + 1, 2 if c in changed else 1]) * (cs // 2)
            cid = codec.digest(data)
            repo.put_blobs([(cid, codec.encode(data))])
            ids.append(cid)
        m = build("d", 10 * cs, cs, ids)
        repo.commit(m)
        repo.set_tag("d", "v2" if changed else "v1", m.id)

    version(set())
    version({1, 2, 3, 7})
    repo.close()
    out = run_cli("diff", "d:v1", "d:v2", data=tmp_path / "data").stdout
    assert "  chunks 1-3, 7\n" in out, out
    js = json.loads(run_cli("diff", "d:v1", "d:v2", "--json", data=tmp_path / "data").stdout)
    assert js == {"a": "d:v1", "b": "d:v2", "chunk_size": cs, "changed": [1, 2, 3, 7]}
