"""Numbers of the NBD protocol (``doc/proto.md`` of NetworkBlockDevice/nbd), and the errno table.

Pure data: no I/O. Names follow the specification with the ``NBD_`` prefix dropped.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Limits of this server.
# READ/WRITE requests up to this size are handled whole (one device call, one buffer); larger ones
# are streamed in pieces of STREAM_PIECE bytes (issue 15 item 4), so any length the 32-bit field can
# carry is served and MAX_PAYLOAD advertises no fixed limit (proto.md, "maximum payload size").
STREAM_ABOVE = 32 * 1024 * 1024
STREAM_PIECE = 4 * 1024 * 1024  # a power of two: pieces end on multiples of it (chunk-aligned)
MAX_PAYLOAD = 0xFFFFFFFF  # advertised in NBD_INFO_BLOCK_SIZE: "no fixed limit on request payloads"
MAX_OPTION_LENGTH = 64 * 1024  # larger option payloads are skipped and answered NBD_REP_ERR_TOO_BIG
MAX_STRING = 4096  # the specification's limit for names, queries and messages
ZERO_PADDING = bytes(124)  # end of NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES was negotiated


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Reply(IntEnum):
    """Option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0

# base:allocation extent flags (the same values as blockprov.device.base.STATE_*).
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # the metadata context id this server gives base:allocation


class NbdError(IntEnum):
    """Error values allowed on the wire (they happen to equal Linux errnos)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# errno names (as carried by blockprov.errors.DeviceError.errno_name) → the NBD error to send.
_ERRNO_NAMES: dict[str, NbdError] = {
    **{e.name: e for e in NbdError},
    "EOPNOTSUPP": NbdError.ENOTSUP,
    "EDQUOT": NbdError.ENOSPC,
    "EFBIG": NbdError.ENOSPC,
    "EROFS": NbdError.EPERM,
    "EACCES": NbdError.EPERM,
}


def error_from_name(name: str) -> NbdError:
    """The NBD error for an errno name; anything the protocol cannot say becomes EIO."""
    return _ERRNO_NAMES.get(name, NbdError.EIO)
