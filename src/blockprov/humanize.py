"""Human-readable figures: sizes shown to operators, and sizes read from them."""

from __future__ import annotations

import re
from fractions import Fraction

from blockprov.errors import InvalidSize, UsageError


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``'64K'``, ``'1.5M'``, ``'65536'``, ``'2GiB'`` → bytes (binary units; a fraction rounds down to a byte).

    The one parser of sizes, so every option and tool reads ``1.5M`` alike and names a bad value
    the same way (InvalidSize: a usage error, and a ValueError for argparse)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise InvalidSize(name=text, why="expected a number of bytes, optionally with a binary unit K, M, G or T "
                                         "(64K, 1.5M, 2GiB)")
    return int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_memory(text: str) -> int:
    """A VM's RAM as qemu's ``-m`` reads it: a plain number is MiB (``512`` is 512 MiB, never 512
    bytes), a unit is binary (``256M``, ``1.5G``, ``2GiB``); bytes, a whole number of MiB above 0.
    Every ``--memory`` of the CLI reads it this way (issue 27: ``vm run --memory 512`` was 512 bytes
    while ``profile record --memory 512`` was MiB)."""
    t = text.strip()
    why = "guest memory is a whole number of MiB above 0 (a plain number is MiB, as qemu's -m: 512, 512M, 2G)"
    try:
        got = parse_size(t + "M" if re.fullmatch(r"\d+", t) else t)
    except InvalidSize:
        raise InvalidSize(name=text, why=why) from None
    if got <= 0 or got % (1 << 20):
        raise InvalidSize(name=text, why=why)
    return got


_IN = re.compile(r"\+(\d+(?:\.\d*)?)\s*([smhd])")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


def parse_when(text: str, now: float) -> float:
    """When something should happen, as a unix time: ``now``, ``+30m`` / ``+2h`` / ``+90s`` / ``+1d``,
    ``08:30`` (the next time the local clock shows it: today, or tomorrow when it has passed) or a
    local date and time ``2026-12-08T08:30`` (ISO 8601). UsageError for anything else. ``now`` is given."""
    import datetime

    t = text.strip()
    if t == "now":
        return now
    if (m := _IN.fullmatch(t)) is not None:
        return now + float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if (m := _CLOCK.fullmatch(t)) is not None:
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour > 23 or minute > 59:
            raise UsageError(f"--at {text}: no such time of day")
        today = datetime.datetime.fromtimestamp(now)
        at = today.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if at.timestamp() <= now:
            at += datetime.timedelta(days=1)
        return at.timestamp()
    try:
        return datetime.datetime.fromisoformat(t).timestamp()
    except ValueError:
        raise UsageError(f"--at {text}: expected now, +30m, 08:30 or 2026-12-08T08:30") from None
