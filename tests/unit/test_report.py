"""agent/report.py: what the repository keeps of an agent that stops (issue 27 item 5: the Pools
page kept clones removed just before their agent stopped)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from blockprov.agent.report import RepositoryLink
from blockprov.repo.local import LocalRepository


def test_a_stopping_agent_sends_its_last_state(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    state: dict[str, Any] = {"kind": "clones", "clones": [{"name": "a-1"}, {"name": "a-2"}]}

    async def main() -> None:
        link = RepositoryLink(repo, "clones-x", lambda: dict(state), {}, ())
        link.start()
        for _ in range(200):  # registered (bounded)
            if repo.agents():
                break
            await asyncio.sleep(0.02)
        state["clones"] = [{"name": "a-1"}]  # a-2 removed, then the agent stops at once
        await link.stop()

    try:
        asyncio.run(main())
        (a,) = repo.agents()
        assert a["info"]["clones"] == [{"name": "a-1"}]
    finally:
        repo.close()
