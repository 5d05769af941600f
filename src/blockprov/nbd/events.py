"""The NBD protocol's vocabulary: its states, its two error kinds and the events
``ServerConnection.next_event`` returns (the h11 ``_events.py`` shape), pure data.

Kept apart from the state machine (protocol.py) so each reads on its own; protocol.py re-exports
every name, so callers import from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from blockprov.nbd.constants import NbdError


class ProtocolError(Exception):
    """Base of the two protocol error kinds."""


class LocalProtocolError(ProtocolError):
    """We (the caller of this module) tried to break the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection must be closed."""


class State(Enum):
    CLIENT_FLAGS = "client-flags"  # greeting sent, waiting for the client's 32-bit flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"
    CLOSED = "closed"  # after NBD_OPT_ABORT, NBD_CMD_DISC or end of stream
    ERROR = "error"  # after a RemoteProtocolError


class NeedData(Enum):
    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake says about one export (the server builds it from a BlockDevice)."""

    size: int
    read_only: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    can_multi_conn: bool = False
    description: str = ""


# --- events ---------------------------------------------------------------------------------
# Plain (non-frozen) slotted dataclasses: one is built per request, so construction must be cheap.


@dataclass(slots=True)
class OptionHandled:
    """An option was answered; its reply bytes are waiting in ``data_to_send()``."""

    option: int
    reply: int


@dataclass(slots=True)
class TransmissionStarted:
    """NBD_OPT_GO or NBD_OPT_EXPORT_NAME succeeded; requests follow."""

    name: str  # the export's key in the table ("" resolved to the default export's name)
    export: ExportInfo
    flags: int  # transmission flags sent to the client
    structured: bool
    block_status: bool  # base:allocation was selected


@dataclass(slots=True)
class Aborted:
    """NBD_OPT_ABORT: the ACK is in ``data_to_send()``; close after sending it."""


@dataclass(slots=True)
class ConnectionClosed:
    """The peer ended the stream between two frames."""


@dataclass(slots=True)
class Read:
    handle: int
    offset: int
    length: int
    fua: bool
    df: bool = False  # NBD_CMD_FLAG_DF: the reply must be one data chunk, however large


@dataclass(slots=True)
class Write:
    """A WRITE's payload, or one piece of it. A request up to ``STREAM_ABOVE`` bytes is one event
    (``first`` and not ``more``). A larger one arrives as consecutive pieces of the same handle,
    each ending on a multiple of ``STREAM_PIECE``: ``first`` on the first, ``more`` on all but the
    last; the request is answered once, after the last (nbd/protocol.py)."""

    handle: int
    offset: int
    data: memoryview  # exactly the payload (or this piece of it); owned by the caller
    fua: bool
    first: bool = True
    more: bool = False


@dataclass(slots=True)
class Flush:
    handle: int


@dataclass(slots=True)
class Trim:
    handle: int
    offset: int
    length: int
    fua: bool


@dataclass(slots=True)
class WriteZeroes:
    handle: int
    offset: int
    length: int
    fua: bool
    may_trim: bool  # NBD_CMD_FLAG_NO_HOLE was not set
    fast_only: bool  # NBD_CMD_FLAG_FAST_ZERO


@dataclass(slots=True)
class BlockStatus:
    handle: int
    offset: int
    length: int
    req_one: bool


@dataclass(slots=True)
class Cache:
    handle: int
    offset: int
    length: int


@dataclass(slots=True)
class Disconnect:
    """NBD_CMD_DISC: answer what is in flight, then close. It has no reply."""


@dataclass(slots=True)
class BadRequest:
    """A request that parsed but is invalid: reply ``reply_error(handle, error, message)``."""

    handle: int
    command: int
    error: NbdError
    message: str


Event = (
    OptionHandled | TransmissionStarted | Aborted | ConnectionClosed | Read | Write | Flush | Trim
    | WriteZeroes | BlockStatus | Cache | Disconnect | BadRequest
)
