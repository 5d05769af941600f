"""Diskless network boot (issue 13 item 6): the command line words and the RAM budget. Pure parts;
the boot itself is tests/boot/test_netboot_diskless.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockprov import codec
from blockprov import manifest as mf
from blockprov.errors import NetbootError
from blockprov.netboot.inagent import mem_total, ram_budget, ram_hydrate
from blockprov.netboot.params import check_params, diskless

BASE = {"repo": "http://r:1", "image": "lab@0123456789abcdef"}


def test_disk_none_is_diskless_and_ram_is_checked() -> None:
    assert diskless(BASE | {"disk": "none"}) and not diskless(BASE | {"disk": "vda"}) and not diskless(BASE)
    check_params(BASE | {"disk": "none", "ram": "512M"})
    with pytest.raises(NetbootError, match=r"blockprov\.ram=lots: expected a size"):
        check_params(BASE | {"disk": "none", "ram": "lots"})
    with pytest.raises(NetbootError, match="at least 16M"):
        check_params(BASE | {"disk": "none", "ram": "1M"})
    with pytest.raises(NetbootError, match="for a diskless machine"):
        check_params(BASE | {"disk": "vda", "ram": "512M"})


def test_ram_budget_defaults_to_half_the_memory(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:        1012345 kB\nMemFree:          900000 kB\n")
    total = mem_total(info)
    assert total == 1012345 * 1024
    assert ram_budget({}, total) == total // 2
    assert ram_budget({"ram": "96M"}, total) == 96 << 20
    info.write_text("nothing\n")
    with pytest.raises(NetbootError, match="MemTotal"):
        mem_total(info)


def test_ram_hydrate_only_when_the_image_data_fits() -> None:
    """Zero chunks take no RAM: a 1 GiB image with 2 non-zero 64 KiB chunks fits 1 MiB."""
    cs = 64 << 10
    ids = [b"\x01" * 32, b"\x02" * 32] + [codec.ZERO_DIGEST] * ((1 << 30) // cs - 2)
    m = mf.build("lab", 1 << 30, cs, ids)
    assert m.stored_bytes_logical() == 2 * cs
    assert ram_hydrate("background", m, 1 << 20) == "background"
    assert ram_hydrate("before-boot", m, cs) == "off"
    assert ram_hydrate("off", m, 1 << 30) == "off"
