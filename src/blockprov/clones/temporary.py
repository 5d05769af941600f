"""Customizing new instances, and the short-lived clones agent that serves them meanwhile.

A customizer works on an instance's NBD export (clones/customize.py), so the instance must be
served while it runs. When a ``clones serve`` or ``pool serve`` process serves the directory, it
does; when none does, ``temporary_agent`` serves the directory from this process for as long as
the customizing lasts, without taking the directory's control socket or the instances' ones (a
server started meanwhile must still get them).

After customizing, each instance is sealed (clones/clones.py, ``seal_instance``): what the
customizer wrote becomes part of the instance's pristine state, so a later ``reset`` keeps it.

Two rules of the temporary agent came from bugs: its socket directory lies under /tmp when TMPDIR
is too deep for a unix socket's address (``names.UNIX_PATH_MAX``: a deep TMPDIR made ``clone
--customize`` fail), and the directory is removed afterwards (every run used to leave one behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from blockprov.agent import control
from blockprov.clones.clones import ClonesAgent, ClonesStatus, remove
from blockprov.clones.customize import customize
from blockprov.errors import BlockprovError
from blockprov.results import from_dict

if TYPE_CHECKING:
    from blockprov.repo.base import Repository

SOCKET = "nbd.sock"
MAX_TMPDIR = 64  # bytes: room left for "/blockprov-clone-XXXXXXXX/nbd.sock" under a unix address's 107


def socket_parent(prefix: str) -> Path:
    """A new private directory for a temporary socket, under TMPDIR when its path is short enough."""
    base = tempfile.gettempdir()
    if len(base.encode()) > MAX_TMPDIR:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@contextlib.asynccontextmanager
async def temporary_agent(root: Path, repo: Repository, prefix: str = "blockprov-clone-") -> AsyncIterator[ClonesAgent]:
    """Every instance of ``root`` served on a unix socket of its own, until the block ends."""
    tmp = socket_parent(prefix)
    try:
        agent = ClonesAgent(root, repo, socket=tmp / SOCKET, control_socket=False)
        await agent.start()
        try:
            yield agent
        finally:
            await agent.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def customize_new(root: Path, repo: Repository, names: list[str], cmd: str,
                        served: bool) -> dict[str, BlockprovError]:
    """Run ``cmd`` on each new instance (``served``: through the process serving ``root``, else a
    temporary agent). An instance whose customizing fails is removed, never handed out half made;
    returns those, each with its error."""
    failed: dict[str, BlockprovError] = {}
    agent: ClonesAgent | None = None
    async with contextlib.AsyncExitStack() as stack:
        if served:
            st = from_dict(ClonesStatus, control.call(root, "status", timeout=30.0))
            uris = {n: str(st.instances[n].uri) for n in names if n in st.instances}
        else:
            agent = await stack.enter_async_context(temporary_agent(root, repo))
            uris = {n: agent.uri(n) for n in names}
        loop = asyncio.get_running_loop()
        for k, name in enumerate(names):
            try:
                if name not in uris:
                    raise BlockprovError(msg=f"instance {name} is not served")
                await loop.run_in_executor(None, customize, cmd, uris[name], name, k)
                # What the customizer wrote is part of the instance's pristine state: a reset keeps it.
                if served:
                    await loop.run_in_executor(None, functools.partial(control.call, root, "seal", timeout=600.0,
                                                                       name=name))
                else:
                    assert agent is not None
                    await agent.seal(name)
            except BlockprovError as e:
                failed[name] = e
    for name in failed:
        remove(root, name)
    return failed
