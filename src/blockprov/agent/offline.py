"""A lifecycle operation on a cache, whether or not an agent serves it.

``reset``, ``snapshot``, ``update``, ``hydrate`` and ``profile save`` work on a cache directory.
When an agent serves it, the operation is asked of that agent through its control socket (the
agent quiesces, changes the cache and goes on serving: only the process holding the cache's lock
may change it). When none does, the cache is opened here and the operation runs in this process.
A cache held by an agent that does not answer is refused, untouched: the operation cannot be run
by the agent, and opening the cache beside it would break the lock.

The repository of a stopped cache is the one the caller names explicitly (``--repo``), else the
one the cache was last attached with (recorded in its metadata), else the caller's default.
``attach`` of an existing cache chooses the same way (a re-attach must not switch to whatever
``$BLOCKPROV_DATA`` names), and the agent then refuses a named one that lacks the cache's version.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from blockprov.agent import control, run_async
from blockprov.errors import AgentDied, AgentNotAnswering, AgentNotRunning, BlockprovError, CacheError, NotFound

if TYPE_CHECKING:  # the device stack loads asyncio and more: only an offline operation loads it
    from blockprov.agent.instance import StatusReport
    from blockprov.cache import CacheDevice, SourceFactory
    from blockprov.repo.base import Repository

OP_TIMEOUT = 24 * 3600.0  # a snapshot of a big disk over a slow link may take long; the agent answers at the end
R = TypeVar("R")


def repository_of(cache_dir: Path, repo_url: str | None, data_dir: str | None) -> tuple[str | None, str | None]:
    """The repository to open for ``cache_dir``, as the ``(--repo URL, --data DIR)`` pair of the
    caller's options: theirs when they name a repository server, else the one the cache was last
    attached with (an embedded repository only when they name no data directory), else theirs."""
    if repo_url:
        return repo_url, data_dir
    from blockprov.cache import load_state

    try:
        recorded = load_state(cache_dir).repository
    except CacheError:
        recorded = None
    if recorded and recorded.startswith(("http://", "https://")):
        return recorded, None
    if recorded and recorded.startswith("file://") and data_dir is None:
        return None, recorded[len("file://"):]
    return repo_url, data_dir


async def adopt_repository(dev: CacheDevice, repo: Repository) -> None:
    """Make ``repo`` the repository ``dev`` records (its next attach or serve uses it), refusing one
    that lacks the cache's version: adopting it would make every read of a missing chunk fail with
    EIO, and record the wrong repository for the next time. (``repository_of`` chooses the one to
    use; this is the check for when the caller named another.) A cache that records none (a clones
    base made before bases recorded theirs) adopts ``repo`` unchecked: there is nothing it would
    replace, and a repository that is down must not keep its local chunks from being served."""
    import asyncio

    from blockprov.errors import NotFound

    recorded = dev.repository
    if recorded is not None and recorded != repo.url:
        m = dev.manifest
        try:
            await asyncio.get_running_loop().run_in_executor(None, repo.resolve, f"{m.image}@{m.id}")
        except NotFound:
            raise CacheError(f"{repo.url} does not hold {m.image}@{m.id}, the version cache {dev.cache_dir} "
                             f"holds; it was attached with {recorded} — name no --repo/--data to use that one, "
                             "or name a repository that holds the version") from None
    dev.record_repository(repo.url)


def on_cache(cache_dir: Path, op: str, args: dict[str, Any],
             offline: Callable[[CacheDevice, Repository], Awaitable[R]], repository: Callable[[Path], Repository],
             result: type[R], *, fetch_timeout: float | None = None) -> R:
    """``op`` run by the agent serving ``cache_dir`` (its answer rebuilt as ``result``, results.py),
    else ``offline`` on the cache opened here with ``repository(cache_dir)`` (opened only then: see
    ``repository_of``). ``fetch_timeout``: how long the offline cache's reads retry an unreachable
    repository before they fail (the agent has its own). An agent that dies before it answers ends
    in AgentDied, saying what became of the operation."""
    cache_dir = cache_dir.resolve()
    try:
        before: dict[str, Any] = control.call(cache_dir, "status", timeout=10.0)  # quick, or the agent is stuck
    except (AgentNotRunning, AgentDied):
        pass  # none, or it just died (nothing was asked of it yet): the operation runs here
    except (AgentNotAnswering, OSError, ValueError) as e:
        raise CacheError(f"an agent holds {cache_dir} but does not answer ({e or type(e).__name__}); "
                         "nothing was changed — stop it (kill its pid, see the cache's lock file) and retry") from None
    else:
        from blockprov.agent.instance import StatusReport
        from blockprov.results import from_dict

        tag_before = _tag(repository, cache_dir, args["to"]) if op == "snapshot" else None
        try:
            return from_dict(result, control.call(cache_dir, op, timeout=OP_TIMEOUT, **args))
        except AgentNotRunning:
            pass  # it stopped before it took the request: the operation runs here, as with no agent
        except AgentDied:
            raise AgentDied(path=str(cache_dir), op=op,
                            outcome=outcome(cache_dir, op, args, from_dict(StatusReport, before), tag_before,
                                            repository)) from None
        except KeyboardInterrupt:  # the agent does not stop because its caller did: say so
            raise KeyboardInterrupt(f"the agent serving {cache_dir} goes on with the {op} (see: blockprov status "
                                    f"--cache {cache_dir})") from None
    from blockprov.cache import CacheDevice, is_cache

    if not is_cache(cache_dir):
        raise CacheError(f"{cache_dir} is not a blockprov cache (no metadata)")
    repo = repository(cache_dir)
    source = stopped_layers(cache_dir, repo, fetch_timeout)

    async def main() -> R:
        dev = await CacheDevice.open(cache_dir, source, repo=repo, create=False)
        try:
            return await offline(dev, repo)
        finally:
            await dev.close()

    out: R = run_async(main())
    return out


def stopped_layers(cache_dir: Path, repo: Repository, fetch_timeout: float | None) -> SourceFactory:
    """The stack below a cache opened here while no agent serves it: the repository, or for an
    overlay its base, which is not opened (its reads fail with EIO: a reset or snapshot of an
    instance reads only what the instance wrote)."""
    from blockprov.cache import DEFAULT_TIMEOUT, base_source, load_state, repository_source

    if load_state(cache_dir).base_cache is not None:
        return base_source(None)
    return repository_source(repo, timeout=DEFAULT_TIMEOUT if fetch_timeout is None else fetch_timeout)


# -- an agent that died during an operation -----------------------------------------------------
UNKNOWN = "?"  # _tag's answer when the repository could not tell


def _tag(repository: Callable[[Path], Repository], cache_dir: Path, ref: str) -> str | None:
    """The version ``ref`` (a snapshot's NAME:TAG) names now: None if none, UNKNOWN if the
    repository cannot tell."""
    try:
        return repository(cache_dir).resolve(ref).id
    except NotFound:
        return None
    except BlockprovError:
        return UNKNOWN


def outcome(cache_dir: Path, op: str, args: dict[str, Any], before: StatusReport, tag_before: str | None,
            repository: Callable[[Path], Repository]) -> str:
    """What is known of ``op``'s effect once the agent serving ``cache_dir`` died before answering,
    from the cache as it is now (its metadata and journal, or the agent a service manager started
    again) against ``before`` (its status when the operation was asked), and for a snapshot from
    the repository (the commit is the acknowledgement: the tag moved, or it did not)."""
    from blockprov.agent.agent import status

    try:
        after = status(cache_dir)
    except BlockprovError as e:
        return f"the cache cannot be read now ({e})"
    restarted = " (an agent serves it again)" if after.agent is not None and after.agent.running else ""
    held_now = after.device.cache
    held = f"{held_now.image}@{held_now.version}"
    if op == "reset":
        n0, n1 = before.device.cache.chunks_modified, held_now.chunks_modified
        if n0 == 0 and n1 == 0:
            return f"there was nothing to reset (no modified chunk){restarted}"
        if n1 == 0:
            return f"the reset took effect: the cache has no modified chunk now (it had {n0}){restarted}"
        return f"the reset did not take effect: the cache has {n1} modified chunk(s) (it had {n0}){restarted}"
    if op == "update":
        try:
            wanted = repository(cache_dir).resolve(str(args["to"])).id
        except BlockprovError as e:
            return f"the cache holds {held} now; {args['to']} cannot be resolved to compare ({e}){restarted}"
        if held_now.version == wanted:
            return f"the update took effect: the cache holds {held} now{restarted}"
        return f"the update did not take effect: the cache holds {held}, not {args['to']} ({wanted}){restarted}"
    if op == "snapshot":
        to = str(args["to"])
        now = _tag(repository, cache_dir, to)
        if now == UNKNOWN or tag_before == UNKNOWN:
            return f"whether the snapshot was committed is not known: the repository cannot tell what {to} " \
                   f"names (look with: blockprov show {to}){restarted}"
        if now is not None and now != tag_before:
            return f"the snapshot was committed: {to} names {now} now{restarted}"
        return f"the snapshot was not committed: {to} " + \
            (f"still names {now}" if now is not None else "does not exist") + restarted
    if op in ("status", "profile"):
        return "it changes nothing"
    return f"whether it took effect is not known; the cache holds {held}{restarted}"
