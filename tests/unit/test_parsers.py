"""The one size parser (humanize.parse_size), the one HOST:PORT parser (names.host_port), and the
name checks of names.py."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from blockprov import names
from blockprov.errors import InvalidName, InvalidSize, UsageError
from blockprov.humanize import parse_memory, parse_size
from blockprov.names import host_port


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("4096", 4096), ("4096B", 4096), ("64K", 64 << 10), ("64k", 64 << 10), ("64KiB", 64 << 10),
    ("64kb", 64 << 10), ("1.5M", 3 << 19), ("1.5m", 3 << 19), ("2GiB", 2 << 30), (" 1 G ", 1 << 30),
    ("1T", 1 << 40), (".5K", 512), ("0.3K", 307),  # a fraction of a byte rounds down
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "-1", "-1M", "1.5.5M", "abc", "1e3", "inf", "nan", "1X", "1 2", "1KK"])
def test_bad_sizes_are_usage_errors_naming_the_value(text: str) -> None:
    with pytest.raises(InvalidSize) as got:
        parse_size(text)
    assert isinstance(got.value, UsageError) and got.value.exit_code == 2 and repr(text) in str(got.value)


def test_a_bad_size_is_a_bad_argument_to_argparse() -> None:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--memory", type=parse_size)
    assert p.parse_args(["--memory", "1.5M"]).memory == 3 << 19
    with pytest.raises(argparse.ArgumentError):
        p.parse_args(["--memory", "lots"])


@pytest.mark.parametrize(("text", "size"), [
    ("512", 512 << 20), (" 512 ", 512 << 20), ("512M", 512 << 20), ("512MiB", 512 << 20), ("1G", 1 << 30),
    ("1.5G", 3 << 29), ("1024K", 1 << 20), ("1T", 1 << 40),
])
def test_guest_memory_is_mib_by_default_as_qemu(text: str, size: int) -> None:
    """Every --memory (vm run, vm clone, profile record) reads a plain number as MiB, as qemu's -m."""
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["0", "0M", "512B", "512K", "1.5M", "-1", "lots", ""])
def test_guest_memory_that_qemu_cannot_take(text: str) -> None:
    with pytest.raises(InvalidSize) as got:
        parse_memory(text)
    assert got.value.exit_code == 2 and repr(text) in str(got.value)


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:8420", ("127.0.0.1", 8420)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("localhost:65535", ("localhost", 65535)),
    ("[::1]:80", ("::1", 80)), ("[::]:0", ("::", 0)), ("[fe80::1%eth0]:9420", ("fe80::1%eth0", 9420)),
    (" repo.example:443 ", ("repo.example", 443)),
])
def test_host_port(text: str, address: tuple[str, int]) -> None:
    assert host_port(text) == address


@pytest.mark.parametrize("text", [
    "8420", ":8420", "127.0.0.1:", "127.0.0.1", "[::1]", "[::1:80", "::1]:80", "[]:80", "[host]:80",
    "a b:80", "host/x:80", "",
])
def test_not_host_port(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--listen must be HOST:PORT"):
        host_port(text)


@pytest.mark.parametrize("port", ["65536", "99999", "-1", "http", "８０", "1.5"])
def test_bad_port(port: str) -> None:
    with pytest.raises(UsageError, match=r"--metrics: the port must be a number from 0 to 65535") as got:
        host_port(f"127.0.0.1:{port}", "--metrics")
    assert got.value.exit_code == 2


def test_ipv6_without_brackets_says_how() -> None:
    with pytest.raises(UsageError, match=r"put an IPv6 address in brackets, \[::1\]:80"):
        host_port("::1:80")


# -- names.py: a whole match, never a match up to a trailing newline (issue 27 item 8) ----------
NAME_CHECKS = [(names.image_name, "lab"), (names.tag_name, "v1"), (names.version_id, "0123456789abcdef"),
               (names.host_id, "pc1"), (names.host_id, "52:54:00:12:34:56"), (names.instance_id, "i-abc"),
               (names.op_name, "snapshot"), (names.request_id, "0123456789abcdef"), (names.token_name, "ops"),
               (names.kernel_args, "console=ttyS0 quiet"), (names.base_url, "http://10.0.2.2:8420")]


@pytest.mark.parametrize(("check", "good"), NAME_CHECKS, ids=[f"{c.__name__}-{g}" for c, g in NAME_CHECKS])
@pytest.mark.parametrize("tail", ["\n", "\r\n", "\nshell", "\x00"])
def test_a_name_followed_by_a_newline_is_refused(check: Callable[[str], str], good: str, tail: str) -> None:
    assert check(good)
    with pytest.raises(InvalidName):
        check(good + tail)
