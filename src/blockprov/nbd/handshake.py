"""The NBD handshake's option haggling (fixed newstyle), pure: an option in, its replies out.

``ServerConnection`` (nbd/protocol.py) frames the bytes (client flags, option headers, payloads
read or skipped) and hands each option here; a ``Handshake`` answers it from the export table,
because every answer is a function of that table and of what was negotiated so far (structured
replies, metadata contexts), and queues the replies in the connection's output. When an option
starts the transmission phase (``NBD_OPT_GO``, ``NBD_OPT_EXPORT_NAME``) it returns
``TransmissionStarted`` and the connection takes over from it: wsproto's shape, a finished
handshake handed to the connection.

A refusal the protocol can answer is an ``OptionError`` (the caller replies with
``option_error`` and the haggling goes on); one it cannot (``NBD_OPT_EXPORT_NAME`` of an unknown
export) is a ``RemoteProtocolError``, and the session ends.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from blockprov.nbd.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    MAX_PAYLOAD,
    MAX_STRING,
    OPTION_REPLY_MAGIC,
    ZERO_PADDING,
    ClientFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from blockprov.nbd.events import (
    Aborted,
    Event,
    ExportInfo,
    OptionHandled,
    RemoteProtocolError,
    TransmissionStarted,
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_EXPORT_INFO = struct.Struct(">HQH")  # NBD_INFO_EXPORT: type, size, transmission flags
_BLOCK_INFO = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE: type, min, preferred, max
KNOWN_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)


def transmission_flags(export: ExportInfo, *, structured: bool) -> int:
    flags = (
        TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_CACHE
    )
    if export.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if export.can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


def encode_message(message: str, limit: int = MAX_STRING) -> bytes:
    raw = message.encode("utf-8", "replace")
    if len(raw) > limit:
        raw = raw[:limit].decode("utf-8", "ignore").encode()
    return raw


class _OptionError(Exception):
    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class OptionError(Exception):
    """An option refused with an error reply; the haggling goes on."""

    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class Handshake:
    """The option haggling of one connection; replies go to ``out`` (the connection's output)."""

    def __init__(self, exports: Mapping[str, ExportInfo], default: str | None, out: bytearray) -> None:
        self.exports = exports
        self._default = default
        self.out = out
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None  # export named by the last SET_META_CONTEXT
        self._meta_selected = False
        self.align = 1  # enforced only when the client agreed to our minimum block size

    def client_flags(self, flags: int) -> None:
        if flags & ~KNOWN_CLIENT_FLAGS:
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        # Fixed newstyle is honoured even if the client did not set C_FIXED_NEWSTYLE (allowed).
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)

    def _option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self.out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload))
        self.out += payload

    def option_error(self, option: int, reply: Reply, message: str) -> OptionHandled:
        self._option_reply(option, reply, encode_message(message))
        return OptionHandled(option, reply)

    def _lookup(self, name: str) -> tuple[str, ExportInfo] | None:
        export = self.exports.get(name)
        if export is not None:
            return name, export
        if name == "" and self._default is not None and self._default in self.exports:
            return self._default, self.exports[self._default]
        return None

    def option(self, option: int, data: bytes) -> Event:
        """Answer one option (its reply queued in ``out``); raises ``OptionError`` for a refusal
        the caller answers with ``option_error``, ``RemoteProtocolError`` when the session must end."""
        if option == Option.GO or option == Option.INFO:
            return self._opt_info(option, data)
        if option == Option.EXPORT_NAME:
            return self._opt_export_name(data)
        if option == Option.STRUCTURED_REPLY:
            if data:
                raise OptionError(Reply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            self._option_reply(option, Reply.ACK)
            return OptionHandled(option, Reply.ACK)
        if option == Option.LIST_META_CONTEXT or option == Option.SET_META_CONTEXT:
            return self._opt_meta_context(option, data)
        if option == Option.ABORT:
            self._option_reply(option, Reply.ACK)
            return Aborted()
        if option == Option.LIST:
            if data:
                raise OptionError(Reply.ERR_INVALID, "NBD_OPT_LIST takes no data")
            for name in self.exports:
                raw = name.encode()
                self._option_reply(option, Reply.SERVER, _U32.pack(len(raw)) + raw)
            self._option_reply(option, Reply.ACK)
            return OptionHandled(option, Reply.ACK)
        if option == Option.STARTTLS:
            if data:
                raise OptionError(Reply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            raise OptionError(Reply.ERR_POLICY, "TLS is not offered by this server")
        raise OptionError(Reply.ERR_UNSUP, f"option {option} is not supported")

    @staticmethod
    def _string(data: bytes, pos: int, length: int, what: str) -> str:
        if length > MAX_STRING:
            raise OptionError(Reply.ERR_INVALID, f"{what} longer than {MAX_STRING} bytes")
        try:
            text = data[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise OptionError(Reply.ERR_INVALID, f"{what} is not UTF-8") from None
        if "\0" in text:
            raise OptionError(Reply.ERR_INVALID, f"{what} contains NUL")
        return text

    def _opt_export_name(self, data: bytes) -> Event:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("export name is not UTF-8") from None
        found = self._lookup(name)
        if found is None:
            # NBD_OPT_EXPORT_NAME cannot be refused with a reply: the session must end.
            raise RemoteProtocolError(f"unknown export {name!r}")
        key, export = found
        self._meta_selected = False  # there was no way to say which export contexts were for
        event = self._enter(key, export, align=1)
        self.out += _U64.pack(export.size) + _U16.pack(event.flags)
        if not self.no_zeroes:
            self.out += ZERO_PADDING
        return event

    def _opt_info(self, option: int, data: bytes) -> Event:
        if len(data) < 6:
            raise OptionError(Reply.ERR_INVALID, "option data too short")
        (namelen,) = _U32.unpack_from(data, 0)
        if 4 + namelen + 2 > len(data):
            raise OptionError(Reply.ERR_INVALID, "export name length exceeds option data")
        name = self._string(data, 4, namelen, "export name")
        (count,) = _U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * count != len(data):
            raise OptionError(Reply.ERR_INVALID, "number of information requests does not match the length")
        requests = {_U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(count)}
        found = self._lookup(name)
        if found is None:
            raise OptionError(Reply.ERR_UNKNOWN, f"unknown export {name!r}")
        key, export = found
        # Like qemu: always send NBD_INFO_BLOCK_SIZE; the real minimum (and its enforcement)
        # only if the client promised to honour it, else 1 (so unaligned requests must work).
        honours = option == Option.INFO or Info.BLOCK_SIZE in requests
        minimum = export.min_block if honours else 1
        flags = transmission_flags(export, structured=self.structured)
        self._option_reply(option, Reply.INFO, _EXPORT_INFO.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._option_reply(option, Reply.INFO, _U16.pack(Info.NAME) + key.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._option_reply(
                option, Reply.INFO, _U16.pack(Info.DESCRIPTION) + encode_message(export.description)
            )
        preferred = max(export.preferred_block, export.min_block)
        self._option_reply(option, Reply.INFO, _BLOCK_INFO.pack(Info.BLOCK_SIZE, minimum, preferred, MAX_PAYLOAD))
        self._option_reply(option, Reply.ACK)
        if option == Option.INFO:
            return OptionHandled(option, Reply.ACK)
        if self._meta_export is not None and self._lookup(self._meta_export) != found:
            self._meta_selected = False  # contexts were negotiated for another export
        return self._enter(key, export, align=minimum)

    def _enter(self, key: str, export: ExportInfo, *, align: int) -> TransmissionStarted:
        """The handshake is over: the connection takes ``align`` and the event from here."""
        self.align = max(align, 1)
        block_status = self.structured and self._meta_selected
        flags = transmission_flags(export, structured=self.structured)
        return TransmissionStarted(key, export, flags, self.structured, block_status)

    def _opt_meta_context(self, option: int, data: bytes) -> Event:
        if option == Option.SET_META_CONTEXT and not self.structured:
            raise OptionError(Reply.ERR_INVALID, "structured replies must be negotiated first")
        if len(data) < 8:
            raise OptionError(Reply.ERR_INVALID, "option data too short")
        (namelen,) = _U32.unpack_from(data, 0)
        if 4 + namelen + 4 > len(data):
            raise OptionError(Reply.ERR_INVALID, "export name length exceeds option data")
        name = self._string(data, 4, namelen, "export name")
        pos = 4 + namelen
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(count):
            if pos + 4 > len(data):
                raise OptionError(Reply.ERR_INVALID, "query count exceeds option data")
            (qlen,) = _U32.unpack_from(data, pos)
            if pos + 4 + qlen > len(data):
                raise OptionError(Reply.ERR_INVALID, "query length exceeds option data")
            queries.append(self._string(data, pos + 4, qlen, "query"))
            pos += 4 + qlen
        if pos != len(data):
            raise OptionError(Reply.ERR_INVALID, "trailing bytes after the queries")
        if self._lookup(name) is None:
            raise OptionError(Reply.ERR_UNKNOWN, f"unknown export {name!r}")
        listing = option == Option.LIST_META_CONTEXT
        if listing and not queries:
            matched = True
        else:
            matched = any(q == BASE_ALLOCATION or (listing and q == "base:") for q in queries)
        if matched:
            context_id = 0 if listing else BASE_ALLOCATION_ID
            self._option_reply(option, Reply.META_CONTEXT, _U32.pack(context_id) + BASE_ALLOCATION.encode())
        if not listing:
            self._meta_export = name
            self._meta_selected = matched
        self._option_reply(option, Reply.ACK)
        return OptionHandled(option, Reply.ACK)

