"""The pure NBD protocol, byte by byte: handshake, options, transmission, replies, trickle, fuzz."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockprov.nbd import constants as c
from blockprov.nbd.constants import Command, CommandFlag, Info, NbdError, Option, Reply
from blockprov.nbd.protocol import (
    NEED_DATA,
    PAYLOAD_GROWTH,
    PAYLOAD_PIECE,
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
    OptionHandled,
    Read,
    RemoteProtocolError,
    ServerConnection,
    State,
    TransmissionStarted,
    Trim,
    Write,
    WriteZeroes,
)

MiB = 1 << 20
EXPORTS = {
    "disk": ExportInfo(size=64 * MiB, min_block=512, preferred_block=4096, can_multi_conn=True, description="a disk"),
    "ro": ExportInfo(size=1 * MiB, read_only=True),
}

# --- a tiny client-side codec (also used by test_nbd_server.py) -------------------------------


def client_flags(flags: int = c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(cmd: int, offset: int = 0, length: int = 0, *, handle: int = 1, flags: int = 0,
            data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of each option reply in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        out.append((opt, rtype, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    assert pos == len(data)
    return out


def events(conn: ServerConnection) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def new_conn(default: str | None = None) -> ServerConnection:
    return ServerConnection(EXPORTS, default=default)


def negotiated(*, structured: bool = True, meta: bool = True, export: str = "disk",
               block_size: bool = True) -> ServerConnection:
    conn = new_conn()
    conn.data_to_send()
    wire = client_flags()
    if structured:
        wire += option(Option.STRUCTURED_REPLY)
    if meta:
        wire += option(Option.SET_META_CONTEXT, meta_data(export, "base:allocation"))
    wire += option(Option.GO, go_data(export, *([Info.BLOCK_SIZE] if block_size else [])))
    conn.receive_data(wire)
    evs = events(conn)
    assert isinstance(evs[-1], TransmissionStarted)
    conn.data_to_send()
    return conn


# --- handshake --------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = new_conn()
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.CLIENT_FLAGS


def test_unknown_client_flags_end_the_connection() -> None:
    conn = new_conn()
    conn.receive_data(client_flags(0x4))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()  # stays failed
    assert conn.state is State.ERROR


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = new_conn()
    conn.data_to_send()
    flags = c.ClientFlag.C_FIXED_NEWSTYLE | (c.ClientFlag.C_NO_ZEROES if no_zeroes else 0)
    conn.receive_data(client_flags(flags) + option(Option.EXPORT_NAME, b"disk"))
    [ev] = events(conn)
    assert isinstance(ev, TransmissionStarted)
    assert ev.name == "disk" and not ev.structured and not ev.block_status
    expected_flags = (
        c.TransmissionFlag.HAS_FLAGS | c.TransmissionFlag.SEND_FLUSH | c.TransmissionFlag.SEND_FUA
        | c.TransmissionFlag.SEND_TRIM | c.TransmissionFlag.SEND_WRITE_ZEROES | c.TransmissionFlag.SEND_FAST_ZERO
        | c.TransmissionFlag.SEND_CACHE | c.TransmissionFlag.CAN_MULTI_CONN
    )
    assert ev.flags == expected_flags
    assert conn.data_to_send() == struct.pack(">QH", 64 * MiB, expected_flags) + (b"" if no_zeroes else bytes(124))
    assert conn.state is State.TRANSMISSION


def test_export_name_unknown_ends_the_connection() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(Option.EXPORT_NAME, b"nope"))
    with pytest.raises(RemoteProtocolError, match="unknown export"):
        conn.next_event()


def test_empty_name_is_the_default_export() -> None:
    conn = new_conn(default="ro")
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.GO, go_data("", Info.NAME)))
    [ev] = events(conn)
    assert isinstance(ev, TransmissionStarted) and ev.name == "ro"
    replies = parse_option_replies(conn.data_to_send())
    infos = {struct.unpack(">H", p[:2])[0]: p[2:] for _, t, p in replies if t == Reply.INFO}
    assert infos[Info.NAME] == b"ro"
    size, flags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == MiB and flags & c.TransmissionFlag.READ_ONLY
    assert not flags & c.TransmissionFlag.SEND_TRIM


def test_go_replies_info_then_ack() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.STRUCTURED_REPLY)
                      + option(Option.GO, go_data("disk", Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE, 999)))
    evs = events(conn)
    assert [type(e) for e in evs] == [OptionHandled, TransmissionStarted]
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0] == (Option.STRUCTURED_REPLY, Reply.ACK, b"")
    assert [t for _, t, _ in replies[1:]] == [Reply.INFO] * 4 + [Reply.ACK]
    assert all(o == Option.GO for o, _, _ in replies[1:])
    infos = {struct.unpack(">H", p[:2])[0]: p[2:] for _, t, p in replies if t == Reply.INFO}
    size, flags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == 64 * MiB
    assert flags & c.TransmissionFlag.SEND_DF  # structured replies negotiated
    assert infos[Info.NAME] == b"disk"
    assert infos[Info.DESCRIPTION] == b"a disk"
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (512, 4096, 0xFFFFFFFF)  # no fixed maximum


def test_go_without_block_size_request_advertises_minimum_one_and_accepts_unaligned() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.GO, go_data("disk")))
    events(conn)
    replies = parse_option_replies(conn.data_to_send())
    infos = {struct.unpack(">H", p[:2])[0]: p[2:] for _, t, p in replies if t == Reply.INFO}
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE])[0] == 1
    conn.receive_data(request(Command.READ, 1, 3))
    assert events(conn) == [Read(1, 1, 3, False)]


def test_info_then_unknown_export_then_go() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.INFO, go_data("disk")) + option(Option.GO, go_data("nope")))
    evs = events(conn)
    assert evs == [OptionHandled(Option.INFO, Reply.ACK), OptionHandled(Option.GO, Reply.ERR_UNKNOWN)]
    replies = parse_option_replies(conn.data_to_send())
    assert replies[-1][1] == Reply.ERR_UNKNOWN and b"nope" in replies[-1][2]
    assert conn.state is State.OPTIONS
    conn.receive_data(option(Option.GO, go_data("disk")))
    assert isinstance(events(conn)[0], TransmissionStarted)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x09disk\x00\x00", go_data("disk", 1)[:-1], b"\xff" * 10])
def test_go_malformed_is_invalid(data: bytes) -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.GO, data))
    assert events(conn) == [OptionHandled(Option.GO, Reply.ERR_INVALID)]


def test_list_abort_starttls_unknown() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.LIST) + option(Option.LIST, b"x") + option(Option.STARTTLS)
                      + option(Option.EXTENDED_HEADERS) + option(77, b"abc") + option(Option.ABORT))
    evs = events(conn)
    assert evs[:-1] == [
        OptionHandled(Option.LIST, Reply.ACK),
        OptionHandled(Option.LIST, Reply.ERR_INVALID),
        OptionHandled(Option.STARTTLS, Reply.ERR_POLICY),
        OptionHandled(Option.EXTENDED_HEADERS, Reply.ERR_UNSUP),
        OptionHandled(77, Reply.ERR_UNSUP),
    ]
    assert isinstance(evs[-1], Aborted)
    replies = parse_option_replies(conn.data_to_send())
    servers = [p for o, t, p in replies if t == Reply.SERVER]
    assert servers == [b"\x00\x00\x00\x04disk", b"\x00\x00\x00\x02ro"]
    assert replies[-1] == (Option.ABORT, Reply.ACK, b"")
    assert conn.state is State.CLOSED


def test_structured_reply_with_data_is_invalid() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(Option.STRUCTURED_REPLY, b"x"))
    assert events(conn) == [OptionHandled(Option.STRUCTURED_REPLY, Reply.ERR_INVALID)]
    assert not conn.structured


def test_oversized_option_is_skipped_without_buffering() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + struct.pack(">QII", c.IHAVEOPT, Option.GO, 1 << 30))
    assert events(conn) == [OptionHandled(Option.GO, Reply.ERR_TOO_BIG)]
    chunk = bytes(1 << 20)
    for _ in range(1024):  # 1 GiB streams through, never held
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
        assert len(conn.get_buffer()) <= 1 << 21
    conn.receive_data(option(Option.LIST))
    assert events(conn) == [OptionHandled(Option.LIST, Reply.ACK)]


def test_oversized_export_name_ends_the_connection() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + struct.pack(">QII", c.IHAVEOPT, Option.EXPORT_NAME, 1 << 20))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_bad_option_magic_ends_the_connection() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + struct.pack(">QII", 0x1234, Option.LIST, 0))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


def test_meta_context_negotiation() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(client_flags() + option(Option.SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    assert events(conn) == [OptionHandled(Option.SET_META_CONTEXT, Reply.ERR_INVALID)]  # needs structured
    conn.receive_data(option(Option.STRUCTURED_REPLY)
                      + option(Option.LIST_META_CONTEXT, meta_data("disk"))
                      + option(Option.LIST_META_CONTEXT, meta_data("disk", "base:"))
                      + option(Option.LIST_META_CONTEXT, meta_data("disk", "qemu:dirty-bitmap:x"))
                      + option(Option.SET_META_CONTEXT, meta_data("nope", "base:allocation"))
                      + option(Option.SET_META_CONTEXT, meta_data("disk", "x-foo:bar", "base:allocation"))
                      + option(Option.SET_META_CONTEXT, meta_data("disk", "base:allocation")[:-1]))
    assert [e.reply for e in events(conn) if isinstance(e, OptionHandled)] == [
        Reply.ACK, Reply.ACK, Reply.ACK, Reply.ACK, Reply.ERR_UNKNOWN, Reply.ACK, Reply.ERR_INVALID,
    ]
    replies = parse_option_replies(conn.data_to_send())
    metas = [(o, p) for o, t, p in replies if t == Reply.META_CONTEXT]
    assert metas == [
        (Option.LIST_META_CONTEXT, b"\x00\x00\x00\x00base:allocation"),
        (Option.LIST_META_CONTEXT, b"\x00\x00\x00\x00base:allocation"),
        (Option.SET_META_CONTEXT, b"\x00\x00\x00\x01base:allocation"),
    ]
    conn.receive_data(option(Option.GO, go_data("disk")))
    [ev] = events(conn)
    assert isinstance(ev, TransmissionStarted) and ev.block_status


def test_meta_context_for_another_export_is_dropped_at_go() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(Option.STRUCTURED_REPLY)
                      + option(Option.SET_META_CONTEXT, meta_data("ro", "base:allocation"))
                      + option(Option.GO, go_data("disk")))
    ev = events(conn)[-1]
    assert isinstance(ev, TransmissionStarted) and not ev.block_status
    conn.receive_data(request(Command.BLOCK_STATUS, 0, 4096))
    [bad] = events(conn)
    assert isinstance(bad, BadRequest) and bad.error == NbdError.EINVAL


# --- transmission -----------------------------------------------------------------------------


def test_requests_become_events() -> None:
    conn = negotiated()
    F = CommandFlag
    conn.receive_data(
        request(Command.READ, 4096, 8192, handle=1, flags=F.FUA)
        + request(Command.WRITE, 0, 1024, handle=2, flags=F.FUA, data=b"x" * 1024)
        + request(Command.FLUSH, handle=3)
        + request(Command.TRIM, 0, 4096, handle=4)
        + request(Command.WRITE_ZEROES, 0, 4096, handle=5, flags=F.NO_HOLE | F.FAST_ZERO)
        + request(Command.WRITE_ZEROES, 4096, 4096, handle=6)
        + request(Command.BLOCK_STATUS, 0, 65536, handle=7, flags=F.REQ_ONE)
        + request(Command.CACHE, 0, 65536, handle=8)
        + request(Command.DISC)
    )
    evs = events(conn)
    write = evs[1]
    assert isinstance(write, Write) and bytes(write.data) == b"x" * 1024
    evs[1] = Write(2, 0, memoryview(b""), True)
    assert evs == [
        Read(1, 4096, 8192, True),
        Write(2, 0, memoryview(b""), True),
        Flush(3),
        Trim(4, 0, 4096, False),
        WriteZeroes(5, 0, 4096, False, False, True),
        WriteZeroes(6, 4096, 4096, False, True, False),
        BlockStatus(7, 0, 65536, True),
        Cache(8, 0, 65536),
        Disconnect(),
    ]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("size", [4096, PAYLOAD_PIECE, PAYLOAD_PIECE + 512, MiB, 32 * MiB])
def test_write_payload_received_in_place(size: int) -> None:
    conn = negotiated()
    payload = bytes(range(256)) * (size // 256)
    conn.receive_data(request(Command.WRITE, 0, len(payload), handle=9) + payload[:1000])
    assert conn.next_event() is NEED_DATA
    pos = 1000
    while pos < len(payload):
        buf = conn.get_buffer(65536)
        assert 0 < len(buf) <= len(payload) - pos  # never past the payload's end
        if size <= PAYLOAD_PIECE:
            assert len(buf) == len(payload) - pos  # one buffer of the payload's size
        n = min(65536, len(buf))
        buf[:n] = payload[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        # Held memory follows what arrived, not what the header announced (issue 17).
        bound = size if size <= PAYLOAD_PIECE else PAYLOAD_GROWTH * pos + PAYLOAD_PIECE
        assert conn.payload_memory <= bound
        assert conn.in_frame
    [ev] = events(conn)
    assert isinstance(ev, Write) and ev.handle == 9 and ev.data == payload
    assert conn.payload_memory == 0 and not conn.in_frame
    conn.receive_data(request(Command.FLUSH, handle=10))
    assert events(conn) == [Flush(10)]


def test_announced_payload_that_never_comes_holds_little() -> None:
    """A header claiming the largest whole payload, then a trickle: a piece, not 32 MiB (issue 17)."""
    conn = negotiated()
    conn.receive_data(request(Command.WRITE, 0, c.STREAM_ABOVE, handle=1) + b"x" * 4096)
    assert conn.next_event() is NEED_DATA
    assert conn.payload_memory == PAYLOAD_PIECE and conn.in_frame
    for _ in range(100):
        conn.receive_data(b"y")
        assert conn.next_event() is NEED_DATA
    assert conn.payload_memory == PAYLOAD_PIECE


def test_in_frame_follows_what_the_peer_owes() -> None:
    conn = new_conn()
    assert conn.in_frame  # the greeting is out: the handshake is owed
    conn.receive_data(client_flags() + option(Option.STRUCTURED_REPLY))
    events(conn)
    assert conn.in_frame
    conn.receive_data(option(Option.GO, go_data("disk")))
    events(conn)
    assert conn.state is State.TRANSMISSION and not conn.in_frame  # between requests: an idle disk
    wire = request(Command.READ, 0, 512, handle=1)
    conn.receive_data(wire[:10])
    assert conn.next_event() is NEED_DATA and conn.in_frame  # half a header
    conn.receive_data(wire[10:])
    assert events(conn) == [Read(1, 0, 512, False)] and not conn.in_frame
    bad_write = request(Command.WRITE, 128 * MiB, 4096, handle=2)  # beyond the end: skipped
    conn.receive_data(bad_write + b"z" * 100)
    assert isinstance(conn.next_event(), BadRequest) and conn.in_frame
    conn.receive_data(b"z" * 3996)
    assert conn.next_event() is NEED_DATA and not conn.in_frame


def bad(conn: ServerConnection, wire: bytes) -> BadRequest:
    conn.receive_data(wire)
    [ev] = events(conn)
    assert isinstance(ev, BadRequest)
    return ev


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (Command.READ, 64 * MiB - 512, 1024, 0, NbdError.EINVAL),  # beyond the end
        (Command.READ, (1 << 64) - 512, 1024, 0, NbdError.EINVAL),  # wraps in 64 bits
        (Command.READ, 0, 0, 0, NbdError.EINVAL),  # zero length
        (Command.READ, 1, 512, 0, NbdError.EINVAL),  # unaligned
        (Command.READ, 0, 513, 0, NbdError.EINVAL),
        (Command.READ, 0, 512, CommandFlag.REQ_ONE, NbdError.EINVAL),  # flag not for READ
        (Command.READ, 0, 512, 1 << 9, NbdError.EINVAL),  # unknown flag
        (Command.TRIM, 64 * MiB, 512, 0, NbdError.EINVAL),
        (Command.WRITE_ZEROES, 64 * MiB, 512, 0, NbdError.ENOSPC),
        (Command.WRITE_ZEROES, 0, 512, CommandFlag.DF, NbdError.EINVAL),
        (Command.FLUSH, 0, 512, 0, NbdError.EINVAL),
        (Command.CACHE, 0, 0, 0, NbdError.EINVAL),
        (Command.BLOCK_STATUS, 64 * MiB, 512, 0, NbdError.EINVAL),
        (9, 0, 512, 0, NbdError.EINVAL),  # unknown command
        (0xFFFF, 0, 512, 0, NbdError.EINVAL),
    ],
)
def test_invalid_requests_get_errors_and_the_connection_lives(cmd: int, offset: int, length: int, flags: int,
                                                              error: NbdError) -> None:
    conn = negotiated()
    ev = bad(conn, request(cmd, offset, length, handle=77, flags=flags))
    assert ev.handle == 77 and ev.command == cmd and ev.error == error and ev.message
    conn.receive_data(request(Command.READ, 0, 512, handle=78))
    assert events(conn) == [Read(78, 0, 512, False)]


@pytest.mark.parametrize(
    ("offset", "length", "export", "error"),
    [
        (64 * MiB - 512, 1024, "disk", NbdError.ENOSPC),
        (0, 1000, "disk", NbdError.EINVAL),  # unaligned
        (0, 4096, "ro", NbdError.EPERM),
    ],
)
def test_invalid_write_payload_is_skipped(offset: int, length: int, export: str, error: NbdError) -> None:
    conn = negotiated(export=export, meta=False)
    conn.receive_data(request(Command.WRITE, offset, length, handle=5))
    ev = conn.next_event()
    assert isinstance(ev, BadRequest) and ev.error == error
    sent = 0
    while sent < length:  # streamed through, never held
        n = min(1 << 20, length - sent)
        conn.receive_data(bytes(n))
        sent += n
        assert conn.next_event() is NEED_DATA
    conn.receive_data(request(Command.READ, 0, 512, handle=6))
    assert events(conn) == [Read(6, 0, 512, False)]


def test_read_only_refuses_all_writes() -> None:
    conn = negotiated(export="ro", meta=False)
    for cmd in (Command.TRIM, Command.WRITE_ZEROES):
        assert bad(conn, request(cmd, 0, 512)).error == NbdError.EPERM
    conn.receive_data(request(Command.FLUSH) + request(Command.READ, 0, 512))
    assert len(events(conn)) == 2


def test_block_status_and_df_need_negotiation() -> None:
    conn = negotiated(structured=False, meta=False)
    assert bad(conn, request(Command.BLOCK_STATUS, 0, 512)).error == NbdError.EINVAL
    assert bad(conn, request(Command.READ, 0, 512, flags=CommandFlag.DF)).error == NbdError.EINVAL


def test_bad_request_magic_ends_the_connection() -> None:
    conn = negotiated()
    conn.receive_data(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_end_of_stream() -> None:
    conn = negotiated()
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed()]
    conn = negotiated()
    conn.receive_data(request(Command.READ, 0, 512)[:10])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        conn.next_event()
    conn = negotiated()
    conn.receive_data(request(Command.WRITE, 0, 1024) + bytes(500))
    conn.receive_eof()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# --- replies ----------------------------------------------------------------------------------


def test_simple_replies() -> None:
    conn = negotiated(structured=False, meta=False)
    assert conn.reply_ok(7) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 7)
    assert conn.reply_error(7, NbdError.EIO, "boom") == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 5, 7)
    assert conn.reply_read_header(8, 0, 4096) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 8)
    with pytest.raises(LocalProtocolError):
        conn.reply_error_offset(1, NbdError.EIO, 0)
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(1, 512, [(512, 0)])


def test_structured_replies() -> None:
    conn = negotiated()
    M = c.STRUCTURED_REPLY_MAGIC
    assert conn.reply_read_header(8, 4096, 100) == struct.pack(">IHHQIQ", M, 1, 1, 8, 108, 4096)
    assert conn.reply_error(9, NbdError.EINVAL, "no") == struct.pack(">IHHQIIH", M, 1, 0x8001, 9, 8, 22, 2) + b"no"
    assert conn.reply_error_offset(9, NbdError.EIO, 512, "x") == (
        struct.pack(">IHHQIIH", M, 1, 0x8002, 9, 15, 5, 1) + b"x" + struct.pack(">Q", 512)
    )
    long = conn.reply_error(1, NbdError.EIO, "é" * 5000)
    assert struct.unpack_from(">IH", long, 20)[1] <= 4096
    with pytest.raises(LocalProtocolError):
        conn.reply_error(1, 0)


def test_block_status_reply_merges_cuts_and_req_one() -> None:
    conn = negotiated()
    M = c.STRUCTURED_REPLY_MAGIC

    def descriptors(reply: bytes) -> list[tuple[int, int]]:
        magic, flags, rtype, handle, length = struct.unpack_from(">IHHQI", reply)
        assert (magic, flags, rtype, handle) == (M, 1, 5, 3) and length == len(reply) - 20
        assert struct.unpack_from(">I", reply, 20)[0] == c.BASE_ALLOCATION_ID
        return [struct.unpack_from(">II", reply, 24 + 8 * i) for i in range((length - 4) // 8)]

    exts: Iterable[tuple[int, int]] = [(4096, 3), (4096, 3), (0, 0), (8192, 0), (65536, 2)]
    assert descriptors(conn.reply_block_status(3, 16384, exts)) == [(8192, 3), (8192, 0)]
    assert descriptors(conn.reply_block_status(3, 100000, exts)) == [(8192, 3), (8192, 0), (65536, 2)]
    assert descriptors(conn.reply_block_status(3, 100000, exts, req_one=True)) == [(8192, 3)]
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(3, 4096, [])
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(3, 4096, [(0, 1)])


def test_replies_need_transmission_phase() -> None:
    conn = new_conn()
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)
    with pytest.raises(LocalProtocolError):
        conn.reply_read_header(1, 0, 1)


# --- trickle: the same exchange one byte at a time --------------------------------------------

SESSION = (
    client_flags()
    + option(Option.LIST)
    + option(Option.STRUCTURED_REPLY)
    + option(Option.INFO, go_data("nope"))
    + option(Option.SET_META_CONTEXT, meta_data("disk", "base:allocation"))
    + option(Option.GO, go_data("disk", Info.BLOCK_SIZE, Info.NAME))
    + request(Command.READ, 0, 4096, handle=1)
    + request(Command.WRITE, 4096, 8192, handle=2, data=bytes(range(256)) * 32)
    + request(Command.READ, 1, 4096, handle=3)  # unaligned: EINVAL
    + request(Command.WRITE, 64 * MiB, 512, handle=4, data=b"z" * 512)  # beyond the end, skipped
    + request(Command.BLOCK_STATUS, 0, 1 << 20, handle=5)
    + request(Command.FLUSH, handle=6, flags=CommandFlag.FUA)
    + request(Command.DISC)
)


def describe(ev: Event) -> object:
    if isinstance(ev, Write):
        return ("write", ev.handle, ev.offset, bytes(ev.data))
    return ev


def run_session(chunks: Iterable[bytes]) -> tuple[list[object], bytes]:
    conn = new_conn()
    out = conn.data_to_send()
    seen: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        for ev in events(conn):
            seen.append(describe(ev))
            out += conn.data_to_send()
    return seen, out


def test_trickle_matches_all_at_once() -> None:
    whole = run_session([SESSION])
    trickled = run_session(SESSION[i:i + 1] for i in range(len(SESSION)))
    assert trickled == whole
    seen = whole[0]
    assert seen[-1] == Disconnect()
    assert [type(e).__name__ for e in seen] == [
        "OptionHandled", "OptionHandled", "OptionHandled", "OptionHandled", "TransmissionStarted",
        "Read", "tuple", "BadRequest", "BadRequest", "BlockStatus", "Flush", "Disconnect",
    ]


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=400))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_any_split_matches_all_at_once(cuts: list[int]) -> None:
    chunks = []
    pos = 0
    for n in cuts:
        if pos >= len(SESSION):
            break
        chunks.append(SESSION[pos:pos + n])
        pos += n
    chunks.append(SESSION[pos:])
    assert run_session(chunks) == run_session([SESSION])


# --- fuzz -------------------------------------------------------------------------------------


def feed_fuzz(conn: ServerConnection, data: bytes, cut: int) -> None:
    try:
        for part in (data[:cut], data[cut:], b""):
            conn.receive_data(part)
            for _ in range(10000):
                ev = conn.next_event()
                if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                    break
                conn.data_to_send()
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600))
@settings(max_examples=400, deadline=None)
def test_fuzz_handshake(data: bytes, cut: int) -> None:
    feed_fuzz(new_conn(), data, cut)


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600))
@settings(max_examples=400, deadline=None)
def test_fuzz_options(data: bytes, cut: int) -> None:
    conn = new_conn()
    conn.receive_data(client_flags())
    feed_fuzz(conn, struct.pack(">Q", c.IHAVEOPT) + data, cut)


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600), st.booleans())
@settings(max_examples=400, deadline=None)
def test_fuzz_transmission(data: bytes, cut: int, structured: bool) -> None:
    feed_fuzz(negotiated(structured=structured, meta=structured), struct.pack(">I", c.REQUEST_MAGIC) + data, cut)


option_frames = st.builds(
    lambda opt, payload: option(opt, payload),
    st.integers(min_value=0, max_value=12),
    st.one_of(
        st.binary(max_size=40),
        st.builds(go_data, st.sampled_from(["", "disk", "ro", "x"]), st.integers(0, 5)),
        st.builds(meta_data, st.sampled_from(["", "disk", "x"]), st.sampled_from(["base:allocation", "base:", "q"])),
    ),
)
request_frames = st.builds(
    lambda cmd, off, length, flags: request(cmd, off, length, flags=flags, data=bytes(min(length, 4096))
                                            if cmd == Command.WRITE else b""),
    st.integers(min_value=0, max_value=9),
    st.one_of(st.integers(0, 64 * MiB), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 8192), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 0xFFFF),
)


@given(st.lists(st.one_of(option_frames, request_frames), max_size=12), st.integers(0, 2000))
@settings(max_examples=300, deadline=None)
def test_fuzz_well_framed_sequences(frames: list[bytes], cut: int) -> None:
    data = client_flags() + b"".join(frames)
    feed_fuzz(new_conn(), data, cut)


def test_data_after_a_completed_payload_before_next_event() -> None:
    # Regression (found by fuzzing): once a pending payload was full, receive_data looped forever.
    conn = negotiated()
    conn.receive_data(request(Command.WRITE, 0, 1024, handle=1) + b"a" * 10)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"a" * 1014 + request(Command.FLUSH, handle=2) + request(Command.READ, 0, 512, handle=3))
    evs = events(conn)
    assert [describe(e) for e in evs] == [("write", 1, 0, b"a" * 1024), Flush(2), Read(3, 0, 512, False)]


@given(st.integers(1, 6 * 1024).map(lambda k: 512 * k), st.lists(st.integers(4096, 1 << 20), min_size=1, max_size=40),
       st.integers(0, 28 + 4096))
@settings(max_examples=60, deadline=None)
def test_fuzz_payload_cut_anywhere_arrives_whole_and_bounded(length: int, cuts: list[int], first: int) -> None:
    """A WRITE payload fed in arbitrary pieces (as recv_into fills them) arrives whole, followed
    by the next request, and the memory it holds never passes ``4 × received + 256 KiB``."""
    conn = negotiated(export="disk")
    payload = bytes((i * 7) & 0xFF for i in range(min(length, 4096))) * (length // 4096 + 1)
    payload = payload[:length]
    wire = request(Command.WRITE, 0, length, handle=5) + payload + request(Command.FLUSH, handle=6)
    got: list[object] = []
    pos, i = 0, 0
    while pos < len(wire):
        n = first if i == 0 and first else cuts[i % len(cuts)]
        i += 1
        view = conn.get_buffer(n)
        n = min(n, len(view), len(wire) - pos)
        view[:n] = wire[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        received = min(max(pos - 28, 0), length)
        assert conn.payload_memory <= max(length if length <= PAYLOAD_PIECE else 0,
                                          PAYLOAD_GROWTH * received + PAYLOAD_PIECE)
        got += events(conn)
    assert [describe(e) for e in got] == [("write", 5, 0, payload), Flush(6)]


# --- requests of any size (issue 15 item 4) ---------------------------------------------------

BIG = {"big": ExportInfo(size=4 << 30, min_block=512, preferred_block=4096)}


def negotiated_big(*, structured: bool = True) -> ServerConnection:
    conn = ServerConnection(BIG)
    conn.data_to_send()
    wire = client_flags() + (option(Option.STRUCTURED_REPLY) if structured else b"")
    conn.receive_data(wire + option(Option.GO, go_data("big", Info.BLOCK_SIZE)))
    assert isinstance(events(conn)[-1], TransmissionStarted)
    conn.data_to_send()
    return conn


@pytest.mark.parametrize("split", [1 << 20, 61 * 1024 + 7, 40 * MiB + 28])
def test_large_write_arrives_in_aligned_pieces_that_never_hold_it_whole(split: int) -> None:
    """A 40 MiB WRITE at an offset that is not piece-aligned: pieces end on STREAM_PIECE multiples,
    hold at most one piece each, and together are exactly the payload; the next request follows."""
    conn = negotiated_big()
    offset, length = 3 * MiB + 512, 40 * MiB
    payload = bytes(range(256)) * (length // 256)
    wire = request(Command.WRITE, offset, length, handle=4, flags=CommandFlag.FUA) + payload
    wire += request(Command.FLUSH, handle=5)
    pieces: list[Write] = []
    tail: list[Event] = []
    for pos in range(0, len(wire), split):
        conn.receive_data(wire[pos:pos + split])
        assert conn.payload_memory <= c.STREAM_PIECE
        for ev in events(conn):
            (pieces if isinstance(ev, Write) else tail).append(ev)
    assert tail == [Flush(5)]
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.more for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert all(p.handle == 4 and p.fua for p in pieces)
    assert all((p.offset + len(p.data)) % c.STREAM_PIECE == 0 for p in pieces[:-1])
    assert pieces[0].offset == offset and len(pieces[0].data) == c.STREAM_PIECE - offset % c.STREAM_PIECE
    assert all(a.offset + len(a.data) == b.offset for a, b in itertools.pairwise(pieces))
    assert b"".join(bytes(p.data) for p in pieces) == payload
    assert not conn.in_frame and conn.payload_memory == 0


def test_a_header_announcing_a_gigabyte_holds_a_piece() -> None:
    """Issue 17 still holds for streamed WRITEs: 1 GiB announced, a trickle sent: 256 KiB held."""
    conn = negotiated_big()
    conn.receive_data(request(Command.WRITE, 0, 1 << 30, handle=1) + b"x" * 4096)
    assert conn.next_event() is NEED_DATA
    assert conn.payload_memory == PAYLOAD_PIECE and conn.in_frame
    for _ in range(50):
        conn.receive_data(b"y" * 100)
        assert conn.next_event() is NEED_DATA
    assert conn.payload_memory == PAYLOAD_PIECE
    conn.receive_eof()  # the peer leaves in the middle of the payload: a broken frame
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize("length", [32 * MiB + 512, (4 << 30) - 512])
def test_reads_of_any_length_are_valid(length: int) -> None:
    conn = negotiated_big()
    conn.receive_data(request(Command.READ, 0, length, handle=2))
    assert events(conn) == [Read(2, 0, length, False)]


def test_df_read_too_large_for_one_chunk_is_refused() -> None:
    conn = negotiated_big()
    conn.receive_data(request(Command.READ, 0, 0xFFFFFFFF, handle=2, flags=CommandFlag.DF))  # > one chunk holds
    [ev] = events(conn)
    assert isinstance(ev, BadRequest) and ev.error == NbdError.EOVERFLOW
    conn.receive_data(request(Command.READ, 0, 64 * MiB, handle=3, flags=CommandFlag.DF))
    assert events(conn) == [Read(3, 0, 64 * MiB, False, True)]


def test_read_reply_in_pieces() -> None:
    M = c.STRUCTURED_REPLY_MAGIC
    conn = negotiated_big()
    assert conn.reply_read_header(8, 0, 4096, last=False) == struct.pack(">IHHQIQ", M, 0, 1, 8, 4104, 0)
    assert conn.reply_read_header(8, 4096, 512, first=False) == struct.pack(">IHHQIQ", M, 1, 1, 8, 520, 4096)
    simple = negotiated_big(structured=False)
    assert simple.reply_read_header(8, 0, 4096, last=False) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 8)
    assert simple.reply_read_header(8, 4096, 512, first=False) == b""
