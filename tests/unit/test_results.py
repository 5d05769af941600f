"""results.py: typed results become dicts only at the edges, and come back as their class."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from blockprov.agent.hydrate import HydrationStatus
from blockprov.agent.instance import AgentInfo, StatusReport
from blockprov.agent.lifecycle import ResetResult, UpdateResult
from blockprov.cache import CacheStatus, DeviceStatus, TargetState, Totals
from blockprov.results import from_dict, inline, keyed, omit_none, skip, to_dict


@dataclass(frozen=True)
class Part:
    a: int = 0
    b: str | None = omit_none()


@dataclass(frozen=True)
class Other:
    c: int = 0


@dataclass(frozen=True)
class Whole:
    part: Part = inline()
    where: Path = Path("/")
    start: str = keyed("from", default="x")
    items: list[Part] = field(default_factory=list)
    by_name: dict[str, Part] = field(default_factory=dict)
    extra: Other | None = inline(default=None)
    secret: str = skip(default="")


def test_shapes_parts_keys_and_what_is_left_out() -> None:
    w = Whole(part=Part(a=1), where=Path("/tmp/x"), start="v1", items=[Part(2, "two")], by_name={"k": Part(3)},
              secret="console")
    d = to_dict(w)
    assert d == {"a": 1, "where": "/tmp/x", "from": "v1", "items": [{"a": 2, "b": "two"}], "by_name": {"k": {"a": 3}}}
    back = from_dict(Whole, json.loads(json.dumps(d)))
    assert back == Whole(part=Part(a=1), where=Path("/tmp/x"), start="v1", items=[Part(2, "two")],
                         by_name={"k": Part(3)})
    assert from_dict(Whole, d | {"c": 7}).extra == Other(7)


def test_unknown_keys_are_ignored_and_missing_ones_defaulted() -> None:
    """A newer agent says more, an older one says less: both are read."""
    assert from_dict(Part, {"a": 5, "newer": True}) == Part(a=5)
    old = {"version": "v", "chunks_reset": 2, "chunks_refetched": 0, "seconds": 0.1}
    r = from_dict(ResetResult, old)
    assert r.chunks_from_repository is None and "chunks_from_repository" not in to_dict(r)


def test_a_status_stays_one_flat_object() -> None:
    cache = CacheStatus(image="lab", version="0" * 16, size=4096, chunk_size=4096, cache_dir="/c", data_path="/c/data",
                        chunks_total=1, chunks_present=1, chunks_modified=0, chunks_zero=0, chunks_missing=0,
                        journal_seq=3, totals=Totals(bytes_fetched=4096), targets={"default": TargetState(1, "v2")},
                        chunks_from_repository=0)
    report = StatusReport(device=DeviceStatus(cache=cache, clean_shutdown=True), agent=AgentInfo(running=False),
                          hydration=HydrationStatus(state="done", percent=100.0))
    d = to_dict(report)
    assert d["chunks_total"] == 1 and d["clean_shutdown"] is True and d["agent"] == {"running": False}
    assert d["targets"] == {"default": {"unsynced_chunks": 1, "last_snapshot": "v2"}}
    assert "bytes_fetched" not in d and "verified_chunks" not in d  # a stopped cache has no run figures
    assert from_dict(StatusReport, json.loads(json.dumps(d))) == report


def test_update_result_says_from() -> None:
    d = to_dict(UpdateResult(version="b", from_version="a", chunks_changed=2))
    assert d["from"] == "a" and from_dict(UpdateResult, d).from_version == "a"
