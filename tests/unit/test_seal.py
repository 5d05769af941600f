"""Sealing a clone's customization into its pristine state (issue 17 item 3; clones/clones.py,
``seal_instance``): after it the instance reads the same, nothing is modified, and a reset returns
to the customized content, not the golden one — also over a chunk that is all zeros in the golden
version (its base-zero mark must not send a reset back to zeros) and a chunk the customizer zeroed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockprov.clones.clones import PRISTINE, seal_instance
from blockprov.errors import CacheError
from tests.caches import open_cache
from tests.unit.test_cache_support import DictRepo, make_image
from tests.unit.test_overlay import CS, read_all


def test_a_sealed_customization_survives_writes_and_reset(tmp_path: Path) -> None:
    repo = DictRepo()
    m, golden = make_image(repo, chunks=16)
    assert m.is_zero(3) and not m.is_zero(5)
    base_dir, inst = tmp_path / "base", tmp_path / "inst"

    async def main() -> None:
        await (await open_cache(base_dir, repo, m, read_only=True)).close()
        await (await open_cache(inst, repo, m, base_cache=base_dir)).close()
        base = await open_cache(base_dir, repo, create=False, read_only=True)
        try:
            dev = await open_cache(inst, repo, create=False, base=base)
            await dev.write(CS + 100, b"C" * 300)  # partial: copied from the base first
            await dev.write(3 * CS, b"D" * CS)  # whole, into a chunk that is zero in the golden version
            await dev.write_zeroes(5 * CS, CS)
            custom = await read_all(dev)
            await dev.close()
            (inst / PRISTINE).mkdir()  # a seal that crashed half-way left a layer behind: it is rebuilt
            (inst / PRISTINE / "meta").write_bytes(b"torn")
            assert await seal_instance(inst, repo, base) == 3
            layer = await open_cache(inst / PRISTINE, repo, create=False, read_only=True, base=base)
            try:
                with pytest.raises(CacheError, match="sealed already"):
                    await seal_instance(inst, repo, layer)
                dev = await open_cache(inst, repo, create=False, base=layer)
                try:
                    assert await read_all(dev) == custom
                    assert not dev.modified_chunks()  # pristine, not a change
                    await dev.write(0, b"U" * (8 * CS))  # the user overwrites it all
                    await dev.reset_chunks()
                    assert await read_all(dev) == custom
                finally:
                    await dev.close()
                assert await read_all(layer) == custom
            finally:
                await layer.close()
            assert await read_all(base) == golden
        finally:
            await base.close()

    asyncio.run(main())
