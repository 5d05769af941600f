"""The agent: what runs where a disk is used — an NBD export over a lazy, crash-safe cache
(cache/device.py), its control socket, its lifecycle operations and its metrics.

``run_async`` is here because every process that serves or opens a cache runs the same event loop;
the module imports nothing at load, so importing the package stays free for the CLI's start-up.
"""

from __future__ import annotations

from typing import Any


def run_async(coro: Any) -> Any:
    """Run the agent's event loop: uvloop when installed (faster transports), else asyncio's.

    A Ctrl-C before the loop ran ``coro`` (during uvloop's import, say) closes it: otherwise Python
    warns at exit that it was "never awaited", a second line after the command's one-line error."""
    import inspect

    try:
        try:
            import uvloop
        except ImportError:
            import asyncio

            return asyncio.run(coro)
        return uvloop.run(coro)
    except BaseException:
        if inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            coro.close()
        raise
