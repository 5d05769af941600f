"""The words of the kernel command line the in-machine agent reads (``blockprov.*``). Pure.

``blockprov.repo`` (repository URL, as the machine reaches it), ``blockprov.image`` (``NAME@ID``),
``blockprov.host``, ``blockprov.disk`` (a disk name, e.g. ``vda``; it may name a disk holding a
foreign file system; ``none``: diskless, the cache in RAM), ``blockprov.ram`` (diskless: the most
RAM the cache may take, e.g. ``512M``; default half the machine's memory), ``blockprov.policy``
(``restore``: reboot-to-restore, ``keep``: the disk keeps its changes), ``blockprov.hydrate``
(``background``, ``before-boot``, ``off``; diskless: ``off`` unless said), ``blockprov.readahead``
(the agent's largest read-ahead window, e.g. ``4M``; ``0`` fetches only what the machine reads),
``blockprov.token`` (the token the agent sends, for a repository that enforces tokens: an
``agent`` scope one, set with ``host assign --args``; it is readable by whoever can fetch the
host's boot script or read /proc/cmdline in the machine), ``blockprov.reserve`` (the golden
reserve's size, e.g. ``256M``, used when the disk is initialized: netboot/disk.py),
``blockprov.offline_after`` (seconds the agent waits for an unreachable repository before it boots
from what the disk holds; 0: at once), ``blockprov.site`` (the host's site, from its record: the PC
fetches chunks from the site's other PCs and serves them its own), ``blockprov.peers`` (with a
site: ``on``, the default, serves peers on port 7624; a port number; ``off`` only fetches from
them), ``blockprov.loader=off`` (this boot leaves the disk's boot
loader as it is), ``blockprov.on_move`` (a ``keep`` machine moved to another version: ``snapshot``,
the default, keeps the session's changes the new version cannot keep as a version first;
``discard`` resets them: agent/keep.py), ``blockprov.native=off`` (the agent serves the root over
NBD even when the disk holds the whole image, and the every-day boot is not taken: netboot/native.py,
netboot/everyday.py) and ``blockprov.from=disk`` (added by the disk's own boot loader, netboot/loader.py).
"""

from __future__ import annotations

from blockprov.boot import HYDRATE, POLICIES
from blockprov.errors import InvalidName, NetbootError
from blockprov.humanize import parse_size
from blockprov.names import site_name

DISKLESS = "none"
ON_MOVE = ("snapshot", "discard")


def parse_cmdline(text: str) -> dict[str, str]:
    """``blockprov.X=V`` words of the kernel command line as {X: V}. Pure."""
    out = {}
    for w in text.split():
        if w.startswith("blockprov.") and "=" in w:
            k, v = w[len("blockprov."):].split("=", 1)
            out[k] = v
    return out


def check_params(params: dict[str, str]) -> None:
    for k in ("repo", "image"):
        if not params.get(k):
            raise NetbootError(f"blockprov.{k}= is missing from the kernel command line")
    if params.get("policy", "keep") not in POLICIES:
        raise NetbootError(f"blockprov.policy={params['policy']}: expected one of {', '.join(POLICIES)}")
    if params.get("hydrate", "background") not in HYDRATE:
        raise NetbootError(f"blockprov.hydrate={params['hydrate']}: expected one of {', '.join(HYDRATE)}")
    if params.get("on_move", "snapshot") not in ON_MOVE:
        raise NetbootError(f"blockprov.on_move={params['on_move']}: expected one of {', '.join(ON_MOVE)}")
    if "ram" in params:
        try:
            if parse_size(params["ram"]) < 16 << 20:
                raise NetbootError(f"blockprov.ram={params['ram']}: at least 16M")
        except ValueError:
            raise NetbootError(f"blockprov.ram={params['ram']}: expected a size such as 512M") from None
        if params.get("disk") != DISKLESS:
            raise NetbootError("blockprov.ram= is for a diskless machine (blockprov.disk=none)")
    if "reserve" in params:
        try:
            parse_size(params["reserve"])
        except ValueError:
            raise NetbootError(f"blockprov.reserve={params['reserve']}: expected a size such as 256M") from None
    if "offline_after" in params:
        try:
            if float(params["offline_after"]) < 0:
                raise ValueError
        except ValueError:
            raise NetbootError(f"blockprov.offline_after={params['offline_after']}: expected seconds (>= 0)") from None
    if "site" in params:
        try:
            site_name(params["site"])
        except InvalidName as e:
            raise NetbootError(f"blockprov.site={params['site']}: {e}") from None
    if "peers" in params and params["peers"] not in ("on", "off") and not (
            params["peers"].isdigit() and 0 < int(params["peers"]) < 65536):
        raise NetbootError(f"blockprov.peers={params['peers']}: expected on, off or a port number")
    if "readahead" in params:
        try:
            parse_size(params["readahead"])
        except ValueError:
            raise NetbootError(f"blockprov.readahead={params['readahead']}: expected a size such as 4M or 0") from None


PEER_PORT = 7624  # where a PC of a site serves its peers (blockprov.peers=on)


def peer_port(params: dict[str, str]) -> int | None:
    """The port a PC serves its site's peers on, or None (no site, or ``blockprov.peers=off``)."""
    if not params.get("site"):
        return None
    value = params.get("peers", "on")
    if value == "off":
        return None
    return PEER_PORT if value == "on" else int(value)


def diskless(params: dict[str, str]) -> bool:
    return params.get("disk") == DISKLESS
