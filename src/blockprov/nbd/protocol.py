"""The NBD server protocol as a pure state machine: bytes in, events and bytes out.

No asyncio, no socket, no os (the h11 / wsproto shape). The caller

1. sends :meth:`ServerConnection.data_to_send` (the greeting, right after construction),
2. feeds what the peer sent with :meth:`receive_data` (``b""`` means end of stream), or
   zero-copy with :meth:`get_buffer` + :meth:`buffer_updated` (``asyncio.BufferedProtocol``),
3. pulls events with :meth:`next_event` until it returns :data:`NEED_DATA`, sending
   :meth:`data_to_send` after handshake events, and answering each transmission request with
   the ``reply_*`` methods (in any order, each reply being one unbroken frame).

Handshake (fixed newstyle, option haggling) is answered by a :class:`~blockprov.nbd.handshake.Handshake`
(nbd/handshake.py) from an :class:`ExportInfo` table, because every answer is a function of that
table and of what was negotiated; this class frames its bytes and takes over when it ends. The
caller only learns which export was chosen (:class:`TransmissionStarted`).

Transmission requests are validated here, before any device sees them (like nbdkit's
``validate_request``): a request that parses but is invalid becomes :class:`BadRequest` (the
caller replies with its error and the connection lives); a frame that cannot be parsed raises
:class:`RemoteProtocolError` and the connection must end.

WRITE payloads. A payload already in the receive buffer is copied out once. One still arriving
is received in place (:meth:`get_buffer` hands out the rest of its buffer, the transport
``recv_into``s it): into one ``bytearray`` of exactly its size when it is at most
:data:`PAYLOAD_PIECE` (the usual case), else into a buffer that grows as bytes arrive, to at most
:data:`PAYLOAD_GROWTH` times what was received (copying what it holds when it grows). So the memory a
payload holds follows what the peer really sent (at most ``4 × received + PAYLOAD_PIECE``), never
what its header claims: a header announcing 32 MiB followed by silence costs 256 KiB, not 32 MiB
(issue 17; the transport drops such a peer after its frame timeout, see
:attr:`ServerConnection.in_frame`). The price, paid only by payloads over 256 KiB that did not
arrive with their header, is copying what the buffer held each time it grew: a quarter of a 1 MiB
payload, under a third of a 4 MiB one (joining pieces would copy all of it; a lazily committed
``mmap`` costs a page fault per 4 KiB, slower still below 4 MiB; measured). The :class:`Write`
event carries a ``memoryview`` of the payload, which then belongs to the caller. The payload of an
*invalid* WRITE (out of range, read-only, unaligned) is skipped as it streams in, never buffered,
and answered with an error once its header is parsed: the framing stays intact (the length field
is trusted, at most 4 GiB is discarded), so the connection lives. Oversized option payloads are
likewise skipped and answered ``NBD_REP_ERR_TOO_BIG``.

Requests of any size (issue 15 item 4). Every length the request's 32-bit field can carry is
valid, and ``NBD_INFO_BLOCK_SIZE`` advertises a maximum payload of 0xffffffff ("no fixed limit",
proto.md). A WRITE larger than :data:`~blockprov.nbd.constants.STREAM_ABOVE` is delivered as
consecutive :class:`Write` pieces that end on multiples of
:data:`~blockprov.nbd.constants.STREAM_PIECE` (``first`` / ``more``), each received in its own
buffer by the same grow-as-it-arrives rule, so such a payload never sits in memory whole: the
caller writes each piece through and answers after the last. A large READ is answered piece by
piece by the caller: :meth:`ServerConnection.reply_read_header` with ``first`` / ``last`` gives
the bytes before each piece (simple replies: the one header, then raw data; structured replies:
one ``OFFSET_DATA`` chunk per piece, ``DONE`` on the last).

Two error kinds: :class:`RemoteProtocolError` (the peer broke the protocol; close the
connection) and :class:`LocalProtocolError` (the caller asked for something the protocol does
not allow, e.g. a block-status reply with no extents; a bug on our side).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from blockprov.nbd.constants import (
    BASE_ALLOCATION_ID,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    NBDMAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STREAM_ABOVE,
    STREAM_PIECE,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    HandshakeFlag,
    NbdError,
    Option,
    Reply,
    ReplyType,
)
from blockprov.nbd.events import (
    NEED_DATA,
    Aborted,
    BadRequest,
    BlockStatus,
    Cache,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    Flush,
    LocalProtocolError,
    NeedData,
    OptionHandled,
    ProtocolError,
    Read,
    RemoteProtocolError,
    State,
    TransmissionStarted,
    Trim,
    Write,
    WriteZeroes,
)
from blockprov.nbd.handshake import Handshake, OptionError, encode_message

__all__ = [
    "NEED_DATA",
    "PAYLOAD_GROWTH",
    "PAYLOAD_PIECE",
    "Aborted",
    "BadRequest",
    "BlockStatus",
    "Cache",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "Flush",
    "LocalProtocolError",
    "NeedData",
    "OptionHandled",
    "ProtocolError",
    "Read",
    "RemoteProtocolError",
    "ServerConnection",
    "State",
    "TransmissionStarted",
    "Trim",
    "Write",
    "WriteZeroes",
]


# --- wire formats ---------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + 64-bit offset (OFFSET_DATA)
_EXTENT = struct.Struct(">II")

_GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)

# Plain ints on the per-request path (IntFlag arithmetic runs Python code).
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_DF = int(CommandFlag.DF)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_FLUSH = int(Command.FLUSH)
_TRIM = int(Command.TRIM)
_CACHE = int(Command.CACHE)
_WRITE_ZEROES = int(Command.WRITE_ZEROES)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)

# The command flags each command accepts (FUA is valid on every command once SEND_FUA is set).
_ALLOWED_FLAGS: dict[int, int] = {
    _READ: _FUA | _DF,
    _WRITE: _FUA,
    _DISC: _FUA,
    _FLUSH: _FUA,
    _TRIM: _FUA,
    _CACHE: _FUA,
    _WRITE_ZEROES: _FUA | _NO_HOLE | _FAST_ZERO,
    _BLOCK_STATUS: _FUA | _REQ_ONE,
}
_WRITES = frozenset({_WRITE, _TRIM, _WRITE_ZEROES})
# The receive buffer starts this small and doubles when a frame needs more (_make_room): a connection
# that never gets far (issue 17: many of them, held open) costs 64 KiB, a busy one settles at 128-256.
_RECV_BUFFER = 64 * 1024
# WRITE payloads up to this size that did not arrive with their header get one buffer of their size
# at once; larger ones start with this much and grow as bytes arrive (module docstring).
PAYLOAD_PIECE = 256 * 1024
PAYLOAD_GROWTH = 4  # a growing payload buffer holds at most this many times what was received


class ServerConnection:
    """One NBD connection, server side: handshake, then transmission."""

    def __init__(self, exports: Mapping[str, ExportInfo], *, default: str | None = None) -> None:
        """``exports`` maps names to exports; the empty name means ``exports[""]`` if present,
        else ``exports[default]`` if ``default`` is given."""
        self.state = State.CLIENT_FLAGS
        self._out = bytearray(_GREETING)
        self._handshake = Handshake(exports, default, self._out)  # option haggling (nbd/handshake.py)
        self._buf = bytearray(_RECV_BUFFER)
        self._rpos = 0
        self._wpos = 0
        self._eof = False
        self._skip = 0  # bytes of an invalid payload still to discard
        # WRITE payload being received in place (it may be shorter than the payload: it grows).
        self._payload: bytearray | None = None
        self._received = 0  # bytes of the payload received so far
        self._write_length = 0
        self._write_handle = 0
        self._write_offset = 0
        self._write_fua = False
        self._write_left = 0  # bytes of a streamed WRITE not yet handed out (pieces to come)
        self._write_first = True
        # Negotiated (the handshake's outcome, taken when transmission starts).
        self.structured = False
        self.export_name: str | None = None
        self.export: ExportInfo | None = None
        self._size = 0
        self._read_only = False
        self._align = 1  # enforced only when the client agreed to our minimum block size
        self._block_status = False
        self._replies_allowed = False

    # --- input --------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes queued for the peer (greeting, option replies); empties the queue."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        view = memoryview(data).cast("B")
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def receive_eof(self) -> None:
        self._eof = True

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (for ``asyncio.BufferedProtocol.get_buffer``).

        While a WRITE payload is incomplete this is the rest of that payload's own buffer.
        The returned view must be filled before the next call and reported with
        :meth:`buffer_updated`.
        """
        payload = self._payload
        received = self._received
        if payload is not None and received < self._write_length:
            if received == len(payload):  # full, more to come: grow (a new array; the old may be exported)
                grown = bytearray(min(self._write_length, PAYLOAD_GROWTH * received))
                grown[:received] = payload
                self._payload = payload = grown
            return memoryview(payload)[received:]
        want = max(sizehint, 1)
        if len(self._buf) - self._wpos < want:
            self._make_room(want)
        return memoryview(self._buf)[self._wpos:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload is not None and self._received < self._write_length:
            self._received += nbytes
        else:
            self._wpos += nbytes

    def _make_room(self, want: int) -> None:
        pending = self._wpos - self._rpos
        if pending + want <= len(self._buf):
            # Same-length slice assignment: never resizes (the buffer may be exported).
            self._buf[:pending] = self._buf[self._rpos:self._wpos]
        else:
            new = bytearray(max(2 * len(self._buf), pending + want))
            new[:pending] = self._buf[self._rpos:self._wpos]
            self._buf = new
        self._rpos, self._wpos = 0, pending

    # --- events -------------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA` when more bytes are needed."""
        try:
            state = self.state
            if self._skip and not self._consume_skip():
                return self._need_data()
            if state is State.TRANSMISSION:
                if self._payload is not None or self._write_left:
                    return self._finish_write()
                return self._next_request()
            if state is State.OPTIONS:
                return self._next_option()
            if state is State.CLIENT_FLAGS:
                return self._client_flags()
            if state is State.ERROR:
                raise RemoteProtocolError("connection already failed")
            return NEED_DATA
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _need_data(self) -> NeedData | ConnectionClosed:
        if self._eof:
            if self._rpos == self._wpos and self._payload is None and not self._skip and not self._write_left:
                self.state = State.CLOSED
                return ConnectionClosed()
            raise RemoteProtocolError("peer closed the connection in the middle of a frame")
        return NEED_DATA

    def _consume_skip(self) -> bool:
        n = min(self._skip, self._wpos - self._rpos)
        self._rpos += n
        self._skip -= n
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0
        return self._skip == 0

    # --- handshake ----------------------------------------------------------------------------

    def _client_flags(self) -> Event | NeedData:
        if self._wpos - self._rpos < 4:
            return self._need_data()
        (flags,) = _U32.unpack_from(self._buf, self._rpos)
        self._rpos += 4
        self._handshake.client_flags(flags)
        self.state = State.OPTIONS
        return self._next_option()

    def _next_option(self) -> Event | NeedData:
        avail = self._wpos - self._rpos
        if avail < _OPTION_HEADER.size:
            return self._need_data()
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf, self._rpos)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            if option == Option.EXPORT_NAME:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME too long (it cannot be refused)")
            self._rpos += _OPTION_HEADER.size
            self._skip = length
            self._consume_skip()
            return self._handshake.option_error(option, Reply.ERR_TOO_BIG,
                                                f"option payload of {length} bytes is too large")
        if avail < _OPTION_HEADER.size + length:
            return self._need_data()
        start = self._rpos + _OPTION_HEADER.size
        data = bytes(self._buf[start:start + length])
        self._rpos = start + length
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0
        hs = self._handshake
        try:
            event = hs.option(option, data)
        except OptionError as e:
            return hs.option_error(option, e.reply, e.message)
        self.structured = hs.structured
        if isinstance(event, TransmissionStarted):
            self._enter_transmission(event, hs.align)
        elif isinstance(event, Aborted):
            self.state = State.CLOSED
        return event

    def _enter_transmission(self, started: TransmissionStarted, align: int) -> None:
        self.state = State.TRANSMISSION
        self.export_name = started.name
        self.export = started.export
        self._size = started.export.size
        self._read_only = started.export.read_only
        self._align = align
        self._block_status = started.block_status
        self._replies_allowed = True

    # --- transmission -------------------------------------------------------------------------

    def _next_request(self) -> Event | NeedData:
        rpos = self._rpos
        if self._wpos - rpos < 28:
            return self._need_data()
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._buf, rpos)
        rpos += 28
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        self._rpos = rpos
        error = self._validate(cmd, flags, offset, length)
        if cmd == _WRITE:
            if error is not None:
                self._skip = length
                self._consume_skip()
                return BadRequest(handle, cmd, error[0], error[1])
            return self._start_write(handle, offset, length, bool(flags & _FUA))
        if rpos == self._wpos:
            self._rpos = self._wpos = 0
        if error is not None:
            if cmd == _DISC:
                self.state = State.CLOSED
                return Disconnect()
            return BadRequest(handle, cmd, error[0], error[1])
        if cmd == _READ:
            return Read(handle, offset, length, bool(flags & _FUA), bool(flags & _DF))
        if cmd == _FLUSH:
            return Flush(handle)
        if cmd == _TRIM:
            return Trim(handle, offset, length, bool(flags & _FUA))
        if cmd == _WRITE_ZEROES:
            return WriteZeroes(
                handle, offset, length, bool(flags & _FUA), not flags & _NO_HOLE, bool(flags & _FAST_ZERO)
            )
        if cmd == _BLOCK_STATUS:
            return BlockStatus(handle, offset, length, bool(flags & _REQ_ONE))
        if cmd == _CACHE:
            return Cache(handle, offset, length)
        self.state = State.CLOSED  # _DISC
        return Disconnect()

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> tuple[NbdError, str] | None:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return NbdError.EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return NbdError.EINVAL, f"flags {flags:#x} are not valid for command {cmd}"
        if cmd == _DISC:
            return None
        if flags & _DF and not self.structured:
            return NbdError.EINVAL, "NBD_CMD_FLAG_DF without structured replies"
        if flags & _DF and length > 0xFFFFFFFF - 8:
            return NbdError.EOVERFLOW, f"{length} bytes do not fit one data chunk (NBD_CMD_FLAG_DF)"
        if self._read_only and cmd in _WRITES:
            return NbdError.EPERM, "the export is read-only"
        if cmd == _FLUSH:
            if offset or length:
                return NbdError.EINVAL, "flush with nonzero offset or length"
            return None
        if cmd == _BLOCK_STATUS and not self._block_status:
            return NbdError.EINVAL, "block status without a negotiated metadata context"
        if length == 0:
            return NbdError.EINVAL, "zero length"
        if offset + length > self._size:
            if cmd in (_WRITE, _WRITE_ZEROES):
                return NbdError.ENOSPC, f"request [{offset}, +{length}) beyond the end of the export ({self._size})"
            return NbdError.EINVAL, f"request [{offset}, +{length}) beyond the end of the export ({self._size})"
        if (offset | length) % self._align:
            return NbdError.EINVAL, f"request not aligned to the minimum block size {self._align}"
        return None  # no maximum: large READs and WRITEs are streamed (module docstring)

    def _start_write(self, handle: int, offset: int, length: int, fua: bool) -> Event | NeedData:
        rpos = self._rpos
        avail = self._wpos - rpos
        if length > STREAM_ABOVE:  # streamed in pieces (module docstring)
            self._write_handle, self._write_offset, self._write_fua = handle, offset, fua
            self._write_left = length
            self._write_first = True
            return self._next_piece()
        if avail >= length:
            data = memoryview(self._buf[rpos:rpos + length])  # one copy out of the ring
            self._rpos = rpos + length
            if self._rpos == self._wpos:
                self._rpos = self._wpos = 0
            return Write(handle, offset, data, fua)
        self._receive_payload(length, avail)
        self._write_handle, self._write_offset, self._write_fua = handle, offset, fua
        return self._need_data()

    def _receive_payload(self, length: int, avail: int) -> None:
        """Start receiving ``length`` payload bytes in place, ``avail`` of them already in the ring."""
        payload = bytearray(length if length <= PAYLOAD_PIECE else max(PAYLOAD_PIECE, avail))
        payload[:avail] = memoryview(self._buf)[self._rpos:self._wpos]
        self._rpos = self._wpos = 0
        self._payload = payload
        self._received = avail
        self._write_length = length

    def _next_piece(self) -> Event | NeedData:
        """The next piece of a streamed WRITE: out of the ring if it is all there, else received in
        place like a whole payload (growing as it arrives)."""
        offset = self._write_offset
        length = min(self._write_left, STREAM_PIECE - offset % STREAM_PIECE)
        rpos = self._rpos
        avail = self._wpos - rpos
        if avail >= length:
            data = memoryview(self._buf[rpos:rpos + length])
            self._rpos = rpos + length
            if self._rpos == self._wpos:
                self._rpos = self._wpos = 0
            return self._piece(data)
        self._receive_payload(length, avail)
        return self._need_data()

    def _piece(self, data: memoryview) -> Write:
        offset = self._write_offset
        self._write_offset = offset + len(data)
        self._write_left -= len(data)
        first, self._write_first = self._write_first, False
        return Write(self._write_handle, offset, data, self._write_fua, first, self._write_left > 0)

    def _finish_write(self) -> Event | NeedData:
        payload = self._payload
        if payload is None:  # between two pieces of a streamed WRITE
            return self._next_piece()
        if self._received < self._write_length:
            return self._need_data()
        self._payload = None
        if self._write_left:
            return self._piece(memoryview(payload))
        return Write(self._write_handle, self._write_offset, memoryview(payload), self._write_fua)

    @property
    def in_frame(self) -> bool:
        """Whether the peer owes us the rest of something: the handshake (until transmission
        starts, every moment is inside it), a request header or payload, or bytes being
        skipped. The transport times such a connection out (a peer idle *between* requests is a
        quiet disk, and may stay)."""
        if self.state is not State.TRANSMISSION:
            return self.state is State.CLIENT_FLAGS or self.state is State.OPTIONS
        return self._payload is not None or self._skip > 0 or self._write_left > 0 or self._wpos != self._rpos

    @property
    def payload_memory(self) -> int:
        """Bytes held by the WRITE payload being received (0 between payloads): for tests and
        for a transport that budgets memory across connections."""
        return len(self._payload) if self._payload is not None else 0

    # --- replies ------------------------------------------------------------------------------

    def _check_replies(self) -> None:
        if not self._replies_allowed:
            raise LocalProtocolError("replies can only be sent in the transmission phase")

    def reply_ok(self, handle: int) -> bytes:
        """Success without payload (a simple reply: valid in both reply modes)."""
        if not self._replies_allowed:
            self._check_replies()
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, error: NbdError | int, message: str = "") -> bytes:
        """An error reply: a structured NBD_REPLY_TYPE_ERROR chunk (with the message) when
        structured replies were negotiated, else a simple reply with no payload."""
        self._check_replies()
        if not error:
            raise LocalProtocolError("an error reply needs a nonzero error")
        if not self.structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        msg = encode_message(message)
        return (
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, handle, 6 + len(msg))
            + struct.pack(">IH", error, len(msg)) + msg
        )

    def reply_error_offset(self, handle: int, error: NbdError | int, offset: int, message: str = "",
                           *, done: bool = True) -> bytes:
        """An NBD_REPLY_TYPE_ERROR_OFFSET chunk (structured replies only)."""
        self._check_replies()
        if not self.structured:
            raise LocalProtocolError("error offsets need structured replies")
        if not error:
            raise LocalProtocolError("an error reply needs a nonzero error")
        msg = encode_message(message)
        return (
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, ReplyType.ERROR_OFFSET, handle,
                        14 + len(msg))
            + struct.pack(">IH", error, len(msg)) + msg + _U64.pack(offset)
        )

    def reply_read_header(self, handle: int, offset: int, length: int, *, first: bool = True,
                          last: bool = True) -> bytes:
        """The bytes that precede exactly ``length`` bytes of data in a successful READ reply:
        a simple reply header, or one NBD_REPLY_TYPE_OFFSET_DATA chunk header (final unless
        ``last`` is false). A reply sent in pieces calls this once per piece, in order, ``first``
        on the first, ``last`` on the last: simple replies have one header (b"" for later pieces,
        whose data just follows); structured replies have one chunk per piece. An error after
        a structured piece went out is :meth:`reply_error_offset`; after a simple header, none
        can be sent (the caller must drop the connection, proto.md)."""
        if not self._replies_allowed:
            self._check_replies()
        if self.structured:
            if not 0 < length <= 0xFFFFFFFF - 8:
                raise LocalProtocolError(f"cannot send {length} bytes in one chunk")
            return _CHUNK_OFFSET.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if last else 0, ReplyType.OFFSET_DATA, handle, 8 + length,
                offset,
            )
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle) if first else b""

    def reply_block_status(self, handle: int, length: int, extents: Iterable[tuple[int, int]],
                           *, req_one: bool = False) -> bytes:
        """An NBD_REPLY_TYPE_BLOCK_STATUS chunk for base:allocation.

        ``extents`` are (length, flags) pairs from the request's offset on; they are cut at the
        request's ``length``, zero-length ones dropped and neighbours with equal flags merged.
        """
        self._check_replies()
        if not self._block_status:
            raise LocalProtocolError("block status was not negotiated")
        merged: list[list[int]] = []
        left = length
        for ext_len, ext_flags in extents:
            if left <= 0:
                break
            if ext_len <= 0:
                continue
            n = min(ext_len, left)
            left -= n
            ext_flags &= 0xFFFFFFFF
            if merged and merged[-1][1] == ext_flags:
                merged[-1][0] += n
            else:
                merged.append([n, ext_flags])
        if not merged:
            raise LocalProtocolError("block status needs at least one extent")
        if req_one:
            del merged[1:]
        body = b"".join(_EXTENT.pack(n, f) for n, f in merged)
        return (
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, handle, 4 + len(body))
            + _U32.pack(BASE_ALLOCATION_ID) + body
        )
