"""MemoryDevice, the reference BlockDevice: checked against a plain bytearray model."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockprov.device.base import STATE_HOLE, STATE_ZERO, BlockDevice, Extent, result_bytes
from blockprov.device.memory import PAGE, MemoryDevice
from blockprov.errors import InvalidRequest, NotSupported, ReadOnlyDevice

SIZE = 8 * PAGE


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_is_a_block_device() -> None:
    dev = MemoryDevice(SIZE)
    assert isinstance(dev, BlockDevice)
    assert (dev.size, dev.min_block, dev.preferred_block, dev.read_only, dev.can_multi_conn) == (
        SIZE, 512, 4096, False, True)


def test_fresh_device_is_one_hole() -> None:
    async def go() -> None:
        dev = MemoryDevice(SIZE)
        assert result_bytes(await dev.read(0, SIZE)) == bytes(SIZE)
        assert await dev.extents(0, SIZE) == [Extent(SIZE, STATE_HOLE | STATE_ZERO)]
        assert dev.allocated_pages == 0

    asyncio.run(go())


def test_write_zero_trim_extents() -> None:
    async def go() -> None:
        dev = MemoryDevice(SIZE)
        await dev.write(PAGE - 512, b"x" * 1024)
        assert dev.allocated_pages == 2
        assert await dev.extents(0, 3 * PAGE) == [Extent(2 * PAGE, 0), Extent(PAGE, 3)]
        await dev.write_zeroes(PAGE, PAGE, may_trim=False)
        assert await dev.extents(0, 3 * PAGE) == [Extent(PAGE, 0), Extent(PAGE, STATE_ZERO), Extent(PAGE, 3)]
        await dev.trim(0, PAGE)
        assert await dev.extents(0, 2 * PAGE) == [Extent(PAGE, 3), Extent(PAGE, STATE_ZERO)]
        assert result_bytes(await dev.read(0, 3 * PAGE)) == bytes(3 * PAGE)
        await dev.write(0, b"y" * 512)
        await dev.trim(0, 512)  # the page becomes all zeros: dropped
        assert await dev.extents(0, PAGE) == [Extent(PAGE, 3)]

    asyncio.run(go())


def test_read_results_are_snapshots() -> None:
    async def go() -> None:
        dev = MemoryDevice(SIZE)
        await dev.write(0, b"a" * 4096)
        before = await dev.read(0, 4096)
        await dev.write(0, b"b" * 512)
        await dev.write_zeroes(512, 512)
        assert result_bytes(before) == b"a" * 4096
        assert result_bytes(await dev.read(0, 1024)) == b"b" * 512 + bytes(512)

    asyncio.run(go())


def test_errors() -> None:
    async def go() -> None:
        dev = MemoryDevice(SIZE, read_only=True)
        with pytest.raises(ReadOnlyDevice):
            await dev.write(0, b"x")
        with pytest.raises(ReadOnlyDevice):
            await dev.trim(0, 512)
        with pytest.raises(InvalidRequest):
            await dev.read(SIZE - 1, 2)
        slow = MemoryDevice(SIZE, fast_zero=False)
        with pytest.raises(NotSupported):
            await slow.write_zeroes(0, 512, fast_only=True)
        await slow.write_zeroes(0, 512)
        assert ReadOnlyDevice.errno_name == "EPERM" and NotSupported.errno_name == "ENOTSUP"

    asyncio.run(go())
    with pytest.raises(ValueError):
        MemoryDevice(1000)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "zero_keep", "trim", "read"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * PAGE),
        st.integers(0, 255),
    ),
    max_size=30,
)


@given(ops)
@settings(max_examples=150, deadline=None)
def test_matches_a_bytearray_model(steps: list[tuple[str, int, int, int]]) -> None:
    async def go() -> None:
        dev = MemoryDevice(SIZE, min_block=1, preferred=1)
        model = bytearray(SIZE)
        held = []
        for op, offset, length, byte in steps:
            length = min(length, SIZE - offset)
            if op == "write":
                await dev.write(offset, bytes([byte]) * length)
                model[offset:offset + length] = bytes([byte]) * length
            elif op in ("zero", "zero_keep", "trim"):
                if op == "trim":
                    await dev.trim(offset, length)
                else:
                    await dev.write_zeroes(offset, length, may_trim=op == "zero")
                model[offset:offset + length] = bytes(length)
            else:
                held.append((await dev.read(offset, length), bytes(model[offset:offset + length])))
        assert result_bytes(await dev.read(0, SIZE)) == model
        for result, expected in held:
            assert result_bytes(result) == expected
        extents = await dev.extents(0, SIZE)
        assert sum(e.length for e in extents) == SIZE
        pos = 0
        for e in extents:
            if e.flags & STATE_ZERO:
                assert model[pos:pos + e.length] == bytes(e.length)
            pos += e.length

    asyncio.run(go())
