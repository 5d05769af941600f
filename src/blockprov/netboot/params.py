"""The words of the kernel command line the in-machine agent reads (``blockprov.*``). Pure.

``blockprov.repo`` (repository URL, as the machine reaches it), ``blockprov.image`` (``NAME@ID``),
``blockprov.host``, ``blockprov.disk`` (a disk name, e.g. ``vda``; it may name a disk holding a
foreign file system), ``blockprov.policy`` (``restore``: reboot-to-restore, ``keep``: the disk keeps
its changes) and ``blockprov.hydrate`` (``background``, ``before-boot``, ``off``), ``blockprov.readahead`` (the
agent's largest read-ahead window, e.g. ``4M``; ``0`` fetches only what the machine reads),
``blockprov.reserve`` (the golden reserve's size, e.g. ``256M``, used when the disk is initialized:
netboot/disk.py), ``blockprov.offline_after`` (seconds the agent waits for an unreachable
repository before it boots from what the disk holds; 0: at once) ``blockprov.loader=off``
(this boot leaves the disk's boot loader as it is) and ``blockprov.from=disk`` (added by the
disk's own boot loader, netboot/loader.py).
"""

from __future__ import annotations

from blockprov.errors import NetbootError
from blockprov.humanize import parse_size

POLICIES = ("restore", "keep")
HYDRATE = ("background", "before-boot", "off")


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
    if "readahead" in params:
        try:
            parse_size(params["readahead"])
        except ValueError:
            raise NetbootError(f"blockprov.readahead={params['readahead']}: expected a size such as 4M or 0") from None
