"""Errors across processes: ``error_to_dict`` / ``error_from_dict`` and the agent's control socket.

What a caller catches must not depend on where the error was raised: a PoolExhausted raised in a
pool server reaches ``pool acquire --wait`` as a PoolExhausted, with its exit code.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from blockprov import errors
from blockprov.agent import control
from blockprov.errors import (
    AgentNotRunning,
    BlockprovError,
    ControlFailed,
    CustomizeFailed,
    InternalError,
    MissingChunks,
    PoolExhausted,
    UsageError,
    error_from_dict,
    error_to_dict,
)


def roundtrip(e: BaseException) -> BlockprovError:
    wire = json.loads(json.dumps(error_to_dict(e)))
    return error_from_dict(wire, lambda message: ControlFailed(message, int(wire["exit_code"])))


@pytest.mark.parametrize("err", [
    PoolExhausted(msg="pool p is exhausted: 0 ready, 2 in use"),
    CustomizeFailed(name="lab-2", why="'cmd' exited with 3: no license left"),
    AgentNotRunning(path="/var/lib/bp/pc1"),
    errors.ImageNotFound(ref="lab:v9"),
    errors.Forbidden(scope="read", action="import", needed="write"),
    UsageError("give --instance NAME or --host ID"),
])
def test_an_error_comes_back_as_itself(err: BlockprovError) -> None:
    back = roundtrip(err)
    assert type(back) is type(err) and str(back) == str(err) and back.exit_code == err.exit_code


def test_missing_chunks_keep_their_list() -> None:
    back = roundtrip(MissingChunks(["aa", "bb"]))
    assert isinstance(back, MissingChunks) and back.missing == ["aa", "bb"] and back.exit_code == 4


def test_an_exception_outside_the_tree_is_an_internal_error() -> None:
    back = roundtrip(ZeroDivisionError("division by zero"))
    assert isinstance(back, InternalError) and back.exit_code == 70
    assert str(back) == "internal error: ZeroDivisionError: division by zero"


def test_an_unknown_class_falls_back_with_its_message_and_code() -> None:
    wire = {"error": "ErrorOfANewerAgent", "message": "the new thing failed", "details": {}, "exit_code": 12}
    back = error_from_dict(wire, lambda message: ControlFailed(message, int(wire["exit_code"])))
    assert isinstance(back, ControlFailed) and str(back) == "the new thing failed" and back.exit_code == 12


def test_a_reply_of_an_older_agent_keeps_its_message_and_code() -> None:
    old = {"ok": False, "error": "no ready instance", "kind": "PoolExhausted", "exit_code": 5}
    back = error_from_dict(old, lambda message: ControlFailed(message, int(old["exit_code"])))
    assert str(back) == "no ready instance" and back.exit_code == 5


def test_names_that_are_not_error_classes_are_not_called() -> None:
    for name in ("error_to_dict", "Any", "__builtins__", "BaseException"):
        back = error_from_dict({"error": name, "message": "m"}, BlockprovError)
        assert type(back) is BlockprovError and str(back) == "m"


# -- the control socket ------------------------------------------------------------------------------
async def _serve_and_call(tmp: Path, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async def pool_acquire(req: dict[str, Any]) -> Any:
        raise PoolExhausted(msg=f"pool p is exhausted (host {req['host']})")

    async def broken(req: dict[str, Any]) -> Any:
        raise KeyError("oops")

    async def fine(req: dict[str, Any]) -> Any:
        return {"echo": req.get("x")}

    server = control.ControlServer({"pool-acquire": pool_acquire, "broken": broken, "status": fine})
    await server.start(control.socket_path(tmp))
    loop = asyncio.get_running_loop()
    out: list[Any] = []
    try:
        for op, args in calls:
            try:
                ask = functools.partial(control.call, tmp, op, timeout=5.0, **args)
                out.append(await loop.run_in_executor(None, ask))
            except BlockprovError as e:
                out.append(e)
    finally:
        await server.close()
    return out


def test_control_socket_raises_the_agents_error_class(tmp_path: Path) -> None:
    ok, exhausted, broken, unknown = asyncio.run(_serve_and_call(tmp_path, [
        ("status", {"x": 1}), ("pool-acquire", {"host": "h1"}), ("broken", {}), ("no-such-op", {})]))
    assert ok == {"echo": 1}
    assert isinstance(exhausted, PoolExhausted) and "host h1" in str(exhausted) and exhausted.exit_code == 5
    assert isinstance(broken, InternalError) and "KeyError" in str(broken) and broken.exit_code == 70
    assert isinstance(unknown, UsageError) and "unknown control op" in str(unknown) and unknown.exit_code == 2


def test_no_agent_is_agent_not_running(tmp_path: Path) -> None:
    with pytest.raises(AgentNotRunning) as got:
        control.call(tmp_path, "status", timeout=1.0)
    assert got.value.exit_code == 8


def test_a_stale_socket_file_is_agent_not_running(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(control.socket_path(tmp_path)))
    s.close()  # bound, never listening: connecting is refused
    with pytest.raises(AgentNotRunning):
        control.call(tmp_path, "status", timeout=1.0)


def test_every_error_class_lives_in_errors_py() -> None:
    """One error tree: a class defined elsewhere would be invisible to ``error_from_dict`` (it
    would come back from an agent or a server as its base class)."""
    import importlib
    import pkgutil

    import blockprov

    for mod in pkgutil.walk_packages(blockprov.__path__, "blockprov."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)

    def tree(cls: type[BlockprovError]) -> list[type[BlockprovError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in tree(sub))]

    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in tree(BlockprovError)
                     if c.__module__.startswith("blockprov.") and c.__module__ != errors.__name__)
    assert outside == []
