"""A development NBD server: ``python -m blockprov.nbd --memory 64M --socket /tmp/s``.

Serves in-memory block devices (``MemoryDevice``) with the same ``NbdServer`` the agent uses, so the
protocol and the transport can be tried with any NBD client (nbdinfo, nbdcopy, qemu-img, qemu-io) without
a repository or a cache; the interop tests (tests/interop) run it. It prints one line,
``nbd: listening on unix:PATH`` or ``tcp:HOST:PORT``, once it accepts connections (tests wait for
it), and stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from blockprov.device.base import BlockDevice
from blockprov.errors import UsageError
from blockprov.humanize import parse_size
from blockprov.names import host_port
from blockprov.nbd.server import FRAME_TIMEOUT, WRITE_TIMEOUT, NbdServer


def _size(text: str) -> int:
    """``parse_size`` with argparse's way of saying no."""
    try:
        value = parse_size(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return value


def _export(spec: str) -> tuple[str, int, bool]:
    """``NAME=SIZE[:ro]`` → (name, size, read-only)."""
    name, eq, rest = spec.partition("=")
    size, _, mode = rest.partition(":")
    if not eq or mode not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"not NAME=SIZE[:ro]: {spec!r}")
    return name, _size(size), mode == "ro"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blockprov.nbd",
                                description="Serve in-memory block devices over NBD (development server).")
    p.add_argument("--memory", type=_size, metavar="SIZE", help="size of the export named by --name")
    p.add_argument("--name", default="", help="name of the --memory export (default: the empty name)")
    p.add_argument("--read-only", action="store_true", help="make the --memory export read-only")
    p.add_argument("--export", action="append", default=[], type=_export, metavar="NAME=SIZE[:ro]",
                   help="one more in-memory export (repeatable)")
    p.add_argument("--min-block", type=_size, default=512)
    p.add_argument("--no-fast-zero", action="store_true", help="refuse NBD_CMD_FLAG_FAST_ZERO with ENOTSUP")
    p.add_argument("--description", default="")
    p.add_argument("--frame-timeout", type=float, default=FRAME_TIMEOUT, metavar="SECONDS",
                   help="drop a client silent this long in the middle of the handshake or a request "
                        f"(default {FRAME_TIMEOUT:g}; 0: never)")
    p.add_argument("--write-timeout", type=float, default=WRITE_TIMEOUT, metavar="SECONDS",
                   help="drop a client that takes none of its replies this long while they wait for it "
                        f"(default {WRITE_TIMEOUT:g}; 0: never)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on a unix socket")
    where.add_argument("--listen", metavar="HOST:PORT", help="listen on TCP (port 0: any free port)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.memory is None and not args.export:
        p.error("give --memory SIZE and/or --export NAME=SIZE")
    if args.listen is not None:
        try:
            args.listen = host_port(args.listen)
        except UsageError as e:
            p.error(str(e))
    return args


async def _serve(args: argparse.Namespace) -> None:
    from blockprov.device.memory import MemoryDevice

    def device(size: int, ro: bool) -> BlockDevice:
        return MemoryDevice(size, min_block=args.min_block, read_only=ro, fast_zero=not args.no_fast_zero)

    exports: dict[str, BlockDevice] = {}
    if args.memory is not None:
        exports[args.name] = device(args.memory, args.read_only)
    for name, size, ro in args.export:
        exports[name] = device(size, ro)
    server = NbdServer(exports, description=args.description, frame_timeout=args.frame_timeout or None,
                       write_timeout=args.write_timeout or None)
    if args.socket:
        address = "unix:" + await server.start_unix(args.socket)
    else:
        host, port = args.listen
        h, p = await server.start_tcp(host or "127.0.0.1", port)
        address = f"tcp:{h}:{p}"
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    print(f"nbd: listening on {address}", flush=True)
    await stop
    await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(_serve(args))
            return 0
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
