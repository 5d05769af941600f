"""agent/lifecycle.py and agent/hydrate.py on an in-process cache over an embedded repository:
reset, snapshot (per target, acknowledged, writes during the upload), update, hydration, profiles."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from blockprov.agent import lifecycle
from blockprov.agent.hydrate import Hydrator
from blockprov.cache import CacheDevice, load_state
from blockprov.device.base import result_bytes
from blockprov.errors import CacheMismatch, RepositoryUnavailable, UsageError
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.results import to_dict
from tests.caches import open_cache
from tests.conftest import make_image

CS = 64 << 10
SIZE = 4 << 20  # 64 chunks


@pytest.fixture
def golden(tmp_path: Path) -> tuple[LocalRepository, Path]:
    repo = LocalRepository(tmp_path / "repo")
    src = make_image(tmp_path / "g.img", SIZE, seed=5, data_fraction=0.8, pattern_every=CS)
    import_image(repo, src, "lab:v1")
    yield repo, src
    repo.close()


async def read_all(dev: CacheDevice) -> bytes:
    return result_bytes(await dev.read(0, dev.size))


def chunk_pattern(i: int, byte: int) -> bytes:
    return bytes([byte, i & 0xFF]) * (CS // 2)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reset_lazy_and_eager_restore_the_base(golden: tuple[LocalRepository, Path], tmp_path: Path) -> None:
    repo, src = golden
    base = src.read_bytes()

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        await dev.write(3 * CS + 100, b"user data")
        await dev.write(10 * CS, chunk_pattern(10, 0xAA))
        await dev.write_zeroes(20 * CS, 2 * CS)
        await dev.trim(30 * CS, CS)
        await dev.flush()
        modified = to_dict(dev.status())["chunks_modified"]  # zeroing a chunk that is zero changes nothing
        assert modified >= 2
        out = to_dict(await lifecycle.reset(dev))
        assert out["chunks_reset"] == modified and out["chunks_refetched"] == 0
        assert to_dict(dev.status())["chunks_modified"] == 0
        await dev.settle()  # the reset chunks' blocks are freed in the background
        assert os.stat(dev.data_path).st_blocks == 0
        assert await read_all(dev) == base
        await dev.write(5 * CS, chunk_pattern(5, 0xBB))
        out = to_dict(await lifecycle.reset(dev, eager=True))
        assert out["chunks_reset"] == 1 and out["chunks_refetched"] == 1
        assert dev.chunks.present(5)
        await dev.close()
        # The reset survives a restart (journal + checkpoint), and nothing is left modified.
        dev = await open_cache(tmp_path / "c", repo)
        assert to_dict(dev.status())["chunks_modified"] == 0
        assert await read_all(dev) == base
        await dev.close()

    run(main())


def test_reset_waits_for_writes_in_flight(golden: tuple[LocalRepository, Path], tmp_path: Path) -> None:
    repo, src = golden

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        # Many concurrent whole-chunk and partial writes racing with a reset: afterwards the disk is
        # the base plus only writes that completed after the reset (none were issued after it).
        writes = [asyncio.ensure_future(dev.write(i * CS + (i % 3) * 512, chunk_pattern(i, 0xC0)[:CS - 1024]))
                  for i in range(0, 64, 2)]
        await asyncio.sleep(0)
        reset = asyncio.ensure_future(lifecycle.reset(dev))
        await asyncio.gather(*writes)
        await reset
        # Every write finished before the reset took the map: nothing is modified any more.
        assert to_dict(dev.status())["chunks_modified"] == 0
        assert await read_all(dev) == src.read_bytes()
        await dev.close()

    run(main())


def test_snapshot_sends_modified_chunks_once_and_tracks_targets(golden: tuple[LocalRepository, Path],
                                                                tmp_path: Path) -> None:
    repo, _ = golden

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        for i in (1, 2, 7):
            await dev.write(i * CS, chunk_pattern(i, 0x11))
        await dev.write_zeroes(9 * CS, CS)
        before = sum(1 for _ in repo.store.iter_ids())
        out = to_dict(await lifecycle.snapshot(dev, repo, "lab:s1"))
        assert out["chunks_modified"] == 4 and out["chunks_sent"] == 3
        assert out["bytes_modified"] == 3 * CS
        assert sum(1 for _ in repo.store.iter_ids()) == before + 3  # the repository's own count
        disk = await read_all(dev)
        new = repo.resolve("lab:s1")
        assert new.id == out["version"] and new.parent == repo.resolve("lab:v1").id
        assert b"".join(repo.store.get(d) if d != bytes(32) else bytes(CS) for d in new.digests()) == disk
        again = to_dict(await lifecycle.snapshot(dev, repo, "lab:s2"))
        assert again["chunks_sent"] == 0 and again["chunks_unsynced_before"] == 0
        # A second target has its own record: everything modified is new to it.
        await dev.write(4 * CS, chunk_pattern(4, 0x22))
        st = to_dict(dev.status())["targets"]
        assert st["default"]["unsynced_chunks"] == 1
        other = to_dict(await lifecycle.snapshot(dev, repo, "lab:o1", target="offsite"))
        assert other["chunks_unsynced_before"] == 5 and other["chunks_sent"] == 1
        st = to_dict(dev.status())["targets"]
        assert st["default"]["unsynced_chunks"] == 1 and st["offsite"]["unsynced_chunks"] == 0
        assert st["offsite"]["last_snapshot"] == other["version"]
        await dev.close()
        # Targets and their state survive a restart.
        dev = await open_cache(tmp_path / "c", repo)
        st = to_dict(dev.status())["targets"]
        assert st["default"]["unsynced_chunks"] == 1 and st["offsite"]["unsynced_chunks"] == 0
        await dev.close()

    run(main())


class GatedRepo:
    """The embedded repository, but ``put_blobs`` waits for the test (an upload in progress)."""

    def __init__(self, inner: LocalRepository) -> None:
        self.inner = inner
        self.url = inner.url
        self.uploading = threading.Event()
        self.release = threading.Event()
        self.fail_commit = False

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        self.uploading.set()
        assert self.release.wait(30)
        return self.inner.put_blobs(items, trusted=trusted)

    def commit(self, manifest: Any, tag: str | None = None) -> str:
        if self.fail_commit:
            raise RepositoryUnavailable(url=self.url, why="switched off by the test")
        return self.inner.commit(manifest, tag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_write_during_upload_stays_unsynced_and_the_version_is_point_in_time(
        golden: tuple[LocalRepository, Path], tmp_path: Path) -> None:
    repo, _ = golden
    gated = GatedRepo(repo)

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", gated, repo.resolve("lab:v1"))  # type: ignore[arg-type]
        for i in range(6):
            await dev.write(i * CS, chunk_pattern(i, 0x33))
        await dev.write(50 * CS, chunk_pattern(50, 0x33))
        await dev.trim(50 * CS, CS)  # a zeroed chunk of the snapshot: its content needs no read
        at_start = await read_all(dev)
        snap = asyncio.ensure_future(lifecycle.snapshot(dev, gated, "lab:s1"))  # type: ignore[arg-type]
        while not gated.uploading.is_set():
            await asyncio.sleep(0.005)
        # The upload is in progress: overwrite two chunks of the snapshot and one outside it.
        await dev.write(2 * CS, chunk_pattern(2, 0x44))
        await dev.write(5 * CS + 10, b"late")
        await dev.write(40 * CS, chunk_pattern(40, 0x44))
        await dev.write(50 * CS + 100, b"into the zeroed chunk")
        await dev.flush()
        gated.release.set()
        out = to_dict(await snap)
        assert out["chunks_written_during"] == 3
        # The version is the disk as it was when the snapshot began (the writes were captured).
        new = repo.resolve("lab:s1")
        content = b"".join(repo.store.get(d) if d != bytes(32) else bytes(CS) for d in new.digests())
        assert content == at_start
        # The written chunks stay unsynced (invariant 4); the others are synced.
        assert set(dev.chunks.unsynced_chunks("default")) == {2, 5, 40, 50}
        crashed = load_state(tmp_path / "c")  # and so after a crash right now (the writes were flushed)
        assert set(crashed.chunks.unsynced_chunks("default")) == {2, 5, 40, 50}
        nxt = to_dict(await lifecycle.snapshot(dev, gated, "lab:s2"))  # type: ignore[arg-type]
        assert nxt["chunks_unsynced_before"] == 4
        await dev.close()

    run(main())


def test_a_write_after_a_snapshot_is_journaled_dirty_before_its_data(golden: tuple[LocalRepository, Path],
                                                                     tmp_path: Path) -> None:
    """A crash right after a write to a synced chunk must not make the target look up to date."""
    repo, _ = golden

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        await dev.write(3 * CS, chunk_pattern(3, 0x55))
        await lifecycle.snapshot(dev, repo, "lab:s1")
        assert dev.chunks.held(3) and dev.chunks.modified(3)
        await dev.write(3 * CS + 7, b"again")  # not flushed: the dirty record alone must be durable
        crashed = load_state(tmp_path / "c")  # what a crash now would find
        assert 3 in crashed.chunks.unsynced_chunks("default")
        await dev.close()

    run(main())


def test_failed_commit_changes_nothing_and_can_be_retried(golden: tuple[LocalRepository, Path],
                                                          tmp_path: Path) -> None:
    repo, _ = golden
    gated = GatedRepo(repo)
    gated.release.set()
    gated.fail_commit = True

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", gated, repo.resolve("lab:v1"))  # type: ignore[arg-type]
        await dev.write(3 * CS, chunk_pattern(3, 0x66))
        with pytest.raises(RepositoryUnavailable):
            await lifecycle.snapshot(dev, gated, "lab:s1")  # type: ignore[arg-type]
        assert to_dict(dev.status())["targets"]["default"]["unsynced_chunks"] == 1
        gated.fail_commit = False
        out = to_dict(await lifecycle.snapshot(dev, gated, "lab:s1"))  # type: ignore[arg-type]
        assert out["chunks_sent"] == 0  # uploaded by the failed attempt already
        assert to_dict(dev.status())["targets"]["default"]["unsynced_chunks"] == 0
        with pytest.raises(UsageError):
            await lifecycle.snapshot(dev, gated, "lab:s2", target="../x")  # type: ignore[arg-type]
        await dev.close()

    run(main())


def test_snapshot_rebase_makes_the_new_version_the_reset_base(golden: tuple[LocalRepository, Path],
                                                              tmp_path: Path) -> None:
    repo, _ = golden

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        await dev.write(3 * CS, chunk_pattern(3, 0x77))
        admin = await read_all(dev)
        out = to_dict(await lifecycle.snapshot(dev, repo, "lab:admin", rebase=True))
        assert dev.manifest.id == out["version"] and to_dict(dev.status())["chunks_modified"] == 0
        await dev.write(8 * CS, chunk_pattern(8, 0x78))
        await lifecycle.reset(dev)
        assert await read_all(dev) == admin
        await dev.close()
        dev = await open_cache(tmp_path / "c", repo)
        assert dev.manifest.id == out["version"] and await read_all(dev) == admin
        await dev.close()

    run(main())


def test_update_fetches_only_changed_chunks_and_applies_the_policy(golden: tuple[LocalRepository, Path],
                                                                   tmp_path: Path) -> None:
    repo, src = golden
    v2 = bytearray(src.read_bytes())
    for i in (4, 11, 12):
        v2[i * CS:(i + 1) * CS] = chunk_pattern(i, 0x99)
    (tmp_path / "v2.img").write_bytes(v2)
    import_image(repo, tmp_path / "v2.img", "lab:v2")

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        await read_all(dev)
        await dev.settle()
        await dev.write(12 * CS, b"mine")  # collides with a change
        await dev.write(30 * CS, b"mine")
        fetched = dev.totals()["chunks_fetched"]
        asked: list[tuple[list[int], list[int]]] = []

        def keep(changed: list[int], modified: list[int]) -> list[int]:  # what agent/keep.py decides
            asked.append((changed, modified))
            return [30]

        out = to_dict(await lifecycle.update(dev, repo.resolve("lab:v2"), keep=keep))
        assert asked == [([4, 11, 12], [12, 30])]
        assert out["chunks_changed"] == 3 and out["chunks_refetched"] == 2
        assert out["modified_kept"] == 1 and out["modified_discarded"] == 1
        assert dev.totals()["chunks_fetched"] == fetched + 2
        disk = await read_all(dev)
        assert disk[30 * CS:30 * CS + 4] == b"mine" and disk[:13 * CS] == bytes(v2[:13 * CS])
        out = to_dict(await lifecycle.update(dev, repo.resolve("lab:v1")))  # back, discarding the user's chunks
        assert out["modified_discarded"] == 1
        assert await read_all(dev) == src.read_bytes()
        with pytest.raises(CacheMismatch):
            other = await asyncio.get_running_loop().run_in_executor(None, lambda: _other_image(repo, tmp_path))
            await lifecycle.update(dev, other)
        await dev.close()

    run(main())


def _other_image(repo: LocalRepository, tmp_path: Path) -> Any:
    import_image(repo, make_image(tmp_path / "o.img", SIZE, seed=9), "other:v1")
    return repo.resolve("other:v1")


def test_hydration_follows_the_profile_then_the_disk_and_records_completion(
        golden: tuple[LocalRepository, Path], tmp_path: Path) -> None:
    repo, src = golden

    async def main() -> None:
        m = repo.resolve("lab:v1")
        dev = await open_cache(tmp_path / "c", repo, m, readahead=0)
        # Profile-only prefetch: exactly the profile's chunks become local.
        profile = [40, 41, 7, 3]
        h = Hydrator(dev, order=profile, profile_only=True)
        await h.start()
        local = {i for i in range(m.count) if dev.chunks.present(i)}
        assert local == {i for i in profile if not m.is_zero(i)}
        assert to_dict(h.status())["state"] == "done"
        h = Hydrator(dev, batch_bytes=4 * CS)
        await h.start()
        st = to_dict(dev.status())
        assert st["chunks_missing"] == 0 and to_dict(h.status())["percent"] == 100.0
        assert st["hydrated"] is not None
        assert await read_all(dev) == src.read_bytes()
        await dev.close()
        assert load_state(tmp_path / "c").hydrated is not None

    run(main())


def test_hydration_takes_small_slices_and_rests_while_clients_miss(
        golden: tuple[LocalRepository, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While clients miss chunks, a hydration batch is at most 256 KiB and hydration rests after
    each batch (as long as it took, at most BUSY_PAUSE_MAX); when they do not, it does neither."""
    from blockprov.agent import hydrate

    repo, src = golden
    rests: list[float] = []
    real_sleep = asyncio.sleep

    class Clock:  # hydrate's asyncio, with sleep recorded (and not slept)
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(seconds: float) -> None:
            rests.append(seconds)
            await real_sleep(0)

    monkeypatch.setattr(hydrate, "asyncio", Clock())

    async def main(busy: bool) -> list[int]:
        m = repo.resolve("lab:v1")
        dev = await open_cache(tmp_path / f"c{busy}", repo, m, readahead=0)
        sizes: list[int] = []
        fetch = dev.fetch_chunks

        async def counting(indices: Sequence[int], *, background: bool = False) -> int:
            assert background
            sizes.append(len(indices))
            if busy:
                dev.last_miss_at = hydrate.time.monotonic()  # a client missed just now
            return await fetch(indices, background=background)

        monkeypatch.setattr(dev, "fetch_chunks", counting)
        if busy:
            dev.last_miss_at = hydrate.time.monotonic()
        await Hydrator(dev).start()
        assert await read_all(dev) == src.read_bytes()
        await dev.close()
        return sizes

    sizes = run(main(busy=True))
    assert sizes and max(sizes) <= hydrate.BUSY_BATCH_BYTES // CS
    assert len(rests) >= len(sizes) - 1 and all(0 <= r <= hydrate.BUSY_PAUSE_MAX for r in rests)
    rests.clear()
    sizes = run(main(busy=False))
    assert max(sizes) > hydrate.BUSY_BATCH_BYTES // CS and rests == []


def test_profile_prefetch_races_ahead_as_client_fetches_do(
        golden: tuple[LocalRepository, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The boot profile's chunks are what the guest reads next: fetched as client fetches (not
    background), without rests, while clients miss too."""
    from blockprov.agent import hydrate

    repo, _ = golden

    async def main() -> list[bool]:
        m = repo.resolve("lab:v1")
        dev = await open_cache(tmp_path / "c", repo, m, readahead=0)
        kinds: list[bool] = []
        fetch = dev.fetch_chunks

        async def recording(indices: Sequence[int], *, background: bool = False) -> int:
            kinds.append(background)
            dev.last_miss_at = hydrate.time.monotonic()
            return await fetch(indices, background=background)

        monkeypatch.setattr(dev, "fetch_chunks", recording)
        profile = [i for i in range(m.count) if not m.is_zero(i)][:6]
        await Hydrator(dev, order=profile, profile_only=True).start()
        await dev.close()
        return kinds

    assert run(main()) == [False]  # six chunks, one batch, a client's


def test_a_profile_may_be_fetched_several_batches_at_a_time(golden: tuple[LocalRepository, Path],
                                                            tmp_path: Path) -> None:
    """``profile_parallel`` (a resumed VM's memory: vm/vms.py): the profile's batches go out together,
    the profile's chunks and then the rest all become local, each fetched once."""
    repo, src = golden

    async def main() -> None:
        m = repo.resolve("lab:v1")
        dev = await open_cache(tmp_path / "c", repo, m, readahead=0)
        profile = [40, 41, 7, 3, 12, 13, 14, 50, 51]
        inflight = peak = 0
        fetch = dev.fetch_chunks

        async def counting(batch: list[int], *, background: bool = False) -> int:
            nonlocal inflight, peak
            inflight += 1
            peak = max(peak, inflight)
            try:
                return await fetch(batch, background=background)
            finally:
                inflight -= 1
        dev.fetch_chunks = counting  # type: ignore[method-assign]
        h = Hydrator(dev, order=profile, batch_bytes=2 * CS, profile_parallel=3)
        await h.start()
        assert peak == 3  # three profile batches at once; the rest one at a time
        assert to_dict(dev.status())["chunks_missing"] == 0 and await read_all(dev) == src.read_bytes()
        assert h.chunks == sum(1 for i in range(m.count) if not m.is_zero(i))
        await dev.close()

    run(main())


def test_the_rest_waits_while_clients_miss_after_the_profile(golden: tuple[LocalRepository, Path],
                                                             tmp_path: Path) -> None:
    """``hold_rest``: the profile is fetched at once, the rest only once the clients stopped missing."""
    repo, src = golden

    async def main() -> None:
        m = repo.resolve("lab:v1")
        dev = await open_cache(tmp_path / "c", repo, m, readahead=0)
        profile = [i for i in (40, 41, 7, 3) if not m.is_zero(i)]
        missing = True

        async def client_misses() -> None:  # a resumed guest still faulting
            while missing:
                dev.last_miss_at = time.monotonic()
                await asyncio.sleep(0.05)
        bump = asyncio.ensure_future(client_misses())
        h = Hydrator(dev, order=profile, hold_rest=60.0)
        task = h.start()
        for _ in range(400):  # bounded: the profile arrives while the client misses
            if all(dev.chunks.present(i) for i in profile):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        present = {i for i in range(m.count) if dev.chunks.present(i)}
        assert present == set(profile)  # and nothing else while the client misses
        missing = False
        await bump
        await asyncio.wait_for(task, 60)
        assert to_dict(dev.status())["chunks_missing"] == 0 and await read_all(dev) == src.read_bytes()
        await dev.close()

    run(main())


def test_the_rest_waits_for_the_clients_to_begin(golden: tuple[LocalRepository, Path], tmp_path: Path) -> None:
    """``hold_rest`` when the profile is in before any client reads (a resumed VM's memory is
    prefetched before its qemu starts): the rest waits for a first miss and a quiet second after it."""
    repo, src = golden

    async def main() -> None:
        m = repo.resolve("lab:v1")
        dev = await open_cache(tmp_path / "c", repo, m, readahead=0)
        profile = [i for i in (40, 41, 7, 3) if not m.is_zero(i)]
        h = Hydrator(dev, order=profile, hold_rest=60.0)
        task = h.start()
        for _ in range(400):  # bounded
            if all(dev.chunks.present(i) for i in profile):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # longer than the quiet second: no client has begun, so the rest waits
        present = {i for i in range(m.count) if dev.chunks.present(i)}
        assert present == set(profile)
        dev.last_miss_at = time.monotonic()  # the guest resumed and missed once, then went quiet
        await asyncio.wait_for(task, 60)
        assert to_dict(dev.status())["chunks_missing"] == 0 and await read_all(dev) == src.read_bytes()
        await dev.close()

    run(main())


def test_first_read_order_is_recorded_and_kept(golden: tuple[LocalRepository, Path], tmp_path: Path) -> None:
    repo, _ = golden

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("lab:v1"))
        for i in (9, 2, 9, 30, 2, 31):
            await dev.read(i * CS, 512)
        await dev.read(5 * CS, 2 * CS)
        assert dev.profile() == [9, 2, 30, 31, 5, 6]
        await dev.close()
        dev = await open_cache(tmp_path / "c", repo)
        assert dev.profile() == [9, 2, 30, 31, 5, 6]
        await dev.close()

    run(main())
