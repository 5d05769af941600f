"""NBD: a pure protocol state machine (:mod:`.protocol`) and a thin asyncio server (:mod:`.server`).

``NbdServer`` and ``ServerStats`` are loaded lazily so that ``python -m blockprov.nbd.server``
does not import the server module twice.
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
