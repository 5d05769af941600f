"""The clones agent as a process of its own: ``python -m blockprov.clones.serve --dir DIR --socket
SOCKET [--repo URL] [--data DIR] [--store SPEC] [--catalog SPEC]``.

vm/vms.py starts it as a VM directory's disks agent (``ROOT/disks``): the same agent as ``blockprov
clones serve`` (clones/clones.py ``ClonesAgent``, registered with its repository), started without
the CLI, which nothing below the CLI may import. The repository is chosen as ``clones serve``
chooses it (the one the directory's base caches were made from, else the options'); the access
token, the CA and the S3 settings come from the environment, as the CLI reads them
(``BLOCKPROV_TOKEN``, ``BLOCKPROV_CA``, ``BLOCKPROV_S3_ENDPOINT``, ``BLOCKPROV_S3_REGION``,
``BLOCKPROV_S3_TIMEOUT``). It prints what it serves, then serves until SIGTERM; an error is one
line on stderr and the error's exit code, as the CLI's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blockprov.errors import BlockprovError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blockprov.clones.serve")
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--socket", required=True, type=Path)
    for opt in ("--repo", "--data", "--store", "--catalog"):
        ap.add_argument(opt)
    a = ap.parse_args(argv)
    try:
        serve(a.dir, a.socket, a.repo, a.data, a.store, a.catalog)
    except BlockprovError as e:
        print(f"blockprov: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def serve(root: Path, sock: Path, repo_url: str | None, data_dir: str | None, store: str | None,
          catalog: str | None) -> None:
    from blockprov.agent import run_async
    from blockprov.agent.offline import repository_of
    from blockprov.clones.clones import ClonesAgent, recorded_repository
    from blockprov.repo.opening import open_repository
    from blockprov.store.factory import StoreOptions

    env = os.environ.get
    options = StoreOptions(endpoint=env("BLOCKPROV_S3_ENDPOINT") or None, region=env("BLOCKPROV_S3_REGION") or None,
                           timeout=float(env("BLOCKPROV_S3_TIMEOUT") or 30.0))
    token, ca = env("BLOCKPROV_TOKEN") or None, env("BLOCKPROV_CA") or None
    root = root.resolve()
    base = recorded_repository(root)
    url, data = repository_of(base, repo_url, data_dir) if base is not None else (repo_url, data_dir)
    if (url, data) == (repo_url, data_dir):
        repo = open_repository(repo_url, data_dir, store, options, token=token, ca=ca, catalog=catalog)
    else:
        repo = open_repository(url, data, token=token, ca=ca)
    sock.parent.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        agent = ClonesAgent(root, repo, socket=sock, register=True)
        agent.catch_signals()
        await agent.start()
        print(f"serving {len(agent.instances)} instance(s) of {agent.root}", flush=True)
        for n in agent.instances:
            print(f"  {n}  {agent.uri(n)}", flush=True)
        await agent.run()

    try:
        run_async(run())
    finally:
        repo.close()


if __name__ == "__main__":
    sys.exit(main())
