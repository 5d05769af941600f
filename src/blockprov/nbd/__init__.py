"""NBD: a pure protocol state machine (:mod:`.protocol`) and a thin asyncio server (:mod:`.server`).

``NbdServer`` and ``ServerStats`` are loaded lazily so that importing the pure protocol (which goes
through this package) does not load the asyncio server. ``python -m blockprov.nbd`` runs a
development server (``__main__.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockprov.nbd.constants import NbdError
from blockprov.nbd.protocol import (
    NEED_DATA,
    ExportInfo,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerConnection,
)

if TYPE_CHECKING:
    from blockprov.nbd.server import NbdServer, ServerStats

__all__ = [
    "NEED_DATA",
    "ExportInfo",
    "LocalProtocolError",
    "NbdError",
    "NbdServer",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerConnection",
    "ServerStats",
]


def __getattr__(name: str) -> Any:
    if name in ("NbdServer", "ServerStats"):
        from blockprov.nbd import server

        return getattr(server, name)
    raise AttributeError(name)
