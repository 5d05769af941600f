"""The agent's local control socket: how CLI commands talk to a running agent.

One request per connection, JSON in one line, JSON back in one line: ``{"op": "status"}`` →
``{"ok": true, "result": {...}}`` or ``{"ok": false, **errors.error_to_dict(e)}`` — the same error
body the HTTP service answers, so ``call`` raises the very class the agent raised (a PoolExhausted
stays a PoolExhausted) and the CLI exits with its code. A handler returns its typed result (a frozen
dataclass, results.py); it becomes JSON here, at the edge, and the caller rebuilds the class it
expects (``results.from_dict``). Later commands (reset, snapshot, hydrate)
register more ops. The socket lives in the cache directory (``DIR/control.sock``) and is only
reachable by local users allowed into that directory.

A request is bounded in size (``MAX_REQUEST``) and in time (``REQUEST_TIMEOUT`` to arrive, as long
again for its answer to be taken), so half-sent requests hold no descriptor for long. Its JSON is
checked by ``jsonvalue`` (deep nesting, NaN, lone surrogates), and a handler reads its arguments
through ``Args``: a wrong type or value is a ``UsageError`` (exit 2), never an internal error.
The same handlers answer the requests the repository queues for the agent (agent/report.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockprov import jsonvalue
from blockprov.errors import (
    AgentDied,
    AgentNotAnswering,
    AgentNotRunning,
    BlockprovError,
    ControlFailed,
    UsageError,
    error_from_dict,
    error_to_dict,
)
from blockprov.names import UNIX_PATH_MAX
from blockprov.results import to_dict

if TYPE_CHECKING:  # the client side (``call``) must stay cheap to import: CLI start-up time
    import asyncio

log = logging.getLogger("blockprov.agent.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20
REQUEST_TIMEOUT = 10.0  # seconds for a request to arrive (the CLI sends it in one write), and for its answer to go
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class Args:
    """A request's arguments, each read with its type and range: a wrong one is a ``UsageError``
    naming it (``{"op": "hydrate", "rate": "abc"}`` used to end in ``float()``'s ValueError, an
    internal error, and ``"eager": "false"`` in an eager reset). ``known``: the arguments the op
    takes; any other is refused before the op starts (``{"op": "hydrate", "rte": 5}`` hydrated at
    full speed, ``{"op": "update", "keep": true}`` dropped the session's changes)."""

    def __init__(self, req: dict[str, Any], *known: str) -> None:
        self.req = req
        self.op = req.get("op")
        unknown = sorted(set(req) - {"op", *known})
        if unknown:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            raise UsageError(f"{str(self.op)[:40]}: unknown argument {', '.join(repr(k[:40]) for k in unknown[:5])}; "
                             + takes)

    def _bad(self, name: str, want: str) -> UsageError:
        return UsageError(f"{self.op}: {name} must be {want}, not {self.req.get(name)!r:.60}")

    def text(self, name: str, default: str | None = "") -> str:
        v = self.req.get(name)
        if v is None:
            if default is None:
                raise UsageError(f"{self.op}: {name} is required")
            return default
        if not isinstance(v, str):
            raise self._bad(name, "a string")
        return v

    def flag(self, name: str) -> bool:
        v = self.req.get(name, False)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise self._bad(name, "true or false")
        return v

    def number(self, name: str, low: float, high: float) -> float | None:
        """A number from ``low`` to ``high``, or None when absent (null, 0 and "" mean absent too)."""
        v = self.req.get(name)
        if v is None or v == 0 or v == "":
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
            raise self._bad(name, f"a number from {low:g} to {high:g}")
        return float(v)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        v = self.req.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise self._bad(name, f"an integer from {low} to {high}")
        return v


def socket_path(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir) / SOCKET_NAME


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits in a unix socket address: itself, or, when the directory is
    deep, the same file through ``/proc/self/fd/N`` of an open handle on its directory (Linux
    resolves it like the real path, for bind and connect alike)."""
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None

    async def start(self, path: Path) -> None:
        import asyncio

        path.unlink(missing_ok=True)  # a stale socket from a killed agent (the cache lock is held: it is ours)
        with reachable(path) as name:
            self._server = await asyncio.start_unix_server(self._serve, path=name, limit=MAX_REQUEST)
        os.chmod(path, 0o600)
        self._path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                req, handler = self._parse(line)
            except TimeoutError:
                reply: dict[str, Any] = {"ok": False, **error_to_dict(UsageError(
                    f"the control request did not arrive within {REQUEST_TIMEOUT:g} s"))}
            except UsageError as e:
                reply = {"ok": False, **error_to_dict(e)}
            except (asyncio.LimitOverrunError, ValueError):  # readline: a line over the limit
                reply = {"ok": False, **error_to_dict(UsageError(f"a control request is at most {MAX_REQUEST} bytes"))}
            else:
                try:
                    reply = {"ok": True, "result": to_dict(await handler(req))}
                except Exception as e:  # the agent keeps serving whatever a command does
                    if not isinstance(e, BlockprovError):
                        log.exception("control op %s failed", req["op"])
                    reply = {"ok": False, **error_to_dict(e)}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or does not take its answer
        except Exception:  # never an unanswered crash of the handler (issue 27): logged, connection closed
            log.exception("control request failed")
        finally:
            writer.close()

    def _parse(self, line: bytes) -> tuple[dict[str, Any], Handler]:
        req = jsonvalue.loads(line, "the control request")
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise UsageError('a control request is {"op": NAME, …}')
        handler = self.handlers.get(req["op"])
        if handler is None:
            raise UsageError(f"unknown control op {req['op'][:40]!r}; this agent answers "
                             f"{', '.join(sorted(self.handlers))}")
        return req, handler


def call(cache_dir: str | os.PathLike[str], op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Ask the agent running on ``cache_dir``: its result, or the error it raised, rebuilt here.
    AgentNotRunning if there is none; AgentNotAnswering if it says nothing for ``timeout`` seconds;
    AgentDied if the connection ends before its answer (the agent was killed or crashed while it
    worked: whether the request took effect is not known here — agent/offline.py finds out)."""
    path = socket_path(cache_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    buf = b""
    try:
        try:
            with reachable(path) as name:
                s.connect(name)
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentNotRunning(path=str(cache_dir)) from None
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    except TimeoutError:
        raise AgentNotAnswering(path=str(cache_dir), op=op, seconds=f"{timeout:g}") from None
    except (ConnectionResetError, BrokenPipeError):
        buf = b""  # the agent went away mid-request: below
    finally:
        s.close()
    if not buf.endswith(b"\n"):
        raise AgentDied(path=str(cache_dir), op=op, outcome="whether it took effect is not known")
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise error_from_dict(reply, lambda message: ControlFailed(message or "control request failed",
                                                                   int(reply.get("exit_code", 1))))
    return reply["result"]
