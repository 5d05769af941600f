"""The one error tree of blockprov.

Each class's docstring is its message template; ``exit_code`` is what the CLI exits with and
``http_status`` what the HTTP service answers; ``transient`` says whether the same request may
succeed if asked again later (retry.py retries only those). Errors are raised deep inside and mapped to an
exit code, an HTTP status or an NBD errno only at the edges (cli/__init__.py, service/, nbd/server.py).

An error that crosses a process boundary travels as JSON naming its class, message and template
fields, and is raised again on the other side as the same class, so the caller's ``except`` clauses
and the CLI's exit code do not depend on where it was raised. An agent's control socket
(agent/control.py) and the HTTP service (service/edge.py's ``error_body``, rebuilt by
``RemoteRepository._error`` in repo/remote.py, which also turns any 5xx into ``RepositoryUnavailable``)
both use ``error_to_dict`` and ``error_from_dict`` below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class BlockprovError(Exception):
    """{msg}"""

    exit_code = 1
    http_status = 500
    transient = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs
        if args and not kwargs:
            kwargs = {"msg": " ".join(str(a) for a in args)}
        try:
            # a template may run over several lines of its docstring: they are one line of message
            message = " ".join(ln.strip() for ln in (self.__doc__ or "{msg}").strip().splitlines()).format(**kwargs)
        except (KeyError, IndexError):
            message = " ".join(str(a) for a in args) or type(self).__name__
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self)


class UsageError(BlockprovError):
    """{msg}"""

    exit_code = 2
    http_status = 400


class InvalidName(UsageError):
    """invalid {kind} {name!r}: {why}"""


class InvalidSize(InvalidName, ValueError):
    """invalid size {name!r}: {why}"""

    # Also a ValueError: argparse (the NBD development server, the benchmarks) reports a bad size as
    # a bad argument, and callers that validate with ``except ValueError`` keep working.


class NotFound(BlockprovError):
    """{msg}"""

    exit_code = 3
    http_status = 404


class RepositoryNotFound(NotFound):
    """no repository at {path}: {why}"""

    # An explicit --data / BLOCKPROV_DATA that does not exist: a read command that created an empty
    # repository there would answer "no images" for a typo (issue 17); only import and serve create one.


class ImageNotFound(NotFound):
    """no such image or version: {ref}"""


class ChunkMissing(NotFound):
    """chunk {digest} is not in the repository"""


class HostNotFound(NotFound):
    """no boot assignment for host {host} (assign one with: blockprov host assign {host} NAME:TAG)"""


class AgentNotFound(NotFound):
    """no agent instance {instance} is registered with this repository"""


class RequestNotFound(NotFound):
    """no request {rid} for agent instance {instance}"""


class ProfileNotFound(NotFound):
    """no boot profile is recorded for {ref}"""


class SiteNotFound(NotFound):
    """no site {site} in this repository (add it with: blockprov site add {site})"""


class IntegrityError(BlockprovError):
    """{msg}"""

    exit_code = 4
    http_status = 422


class ChunkCorrupt(IntegrityError):
    """chunk {digest} is corrupt: {why}"""


class ManifestError(IntegrityError):
    """bad manifest: {why}"""


class MissingChunks(BlockprovError):
    """commit refused: {count} chunk(s) referenced by the manifest are not in the repository"""

    exit_code = 4
    http_status = 409

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(count=len(missing))


class Conflict(BlockprovError):
    """{msg}"""

    exit_code = 5
    http_status = 409


class PoolExhausted(Conflict):
    """{msg}"""


class KeepWouldMerge(Conflict):
    """{msg}"""


class BootFilesMissing(Conflict):
    """{ref} has no boot files (a PC that boots onto its own disk needs blockprov's initramfs:
    blockprov boot-files build {ref}; any other kernel and initrd: blockprov boot-files set {ref}
    --kernel FILE --initrd FILE)"""


class EfiLoaderMissing(Conflict):
    """{ref} has no UEFI loader ({missing} missing): a UEFI PC boots it through iPXE only and its disk gets no \
UEFI loader (store Debian's with: blockprov boot-files build {ref}, or boot-files set {ref} … --efi DIR, on a \
machine with shim-signed and grub-efi-amd64-signed)"""


class VmNotRunning(Conflict):
    """VM {name} is not running ({state})"""


class TemplateMismatch(Conflict):
    """template {name} cannot be cloned this way: {why}"""

    # The clone's machine must be the template's exactly (qemu version, machine type, memory,
    # CPUs, devices): device state migrated into another machine is undefined behaviour.


class NotEnoughMemory(Conflict):
    """not enough host memory for {what}: {needed} needed, {available} available (MemAvailable)"""


class TemplateDamaged(IntegrityError):
    """template {name} is damaged: {why}"""


class VmFailed(BlockprovError):
    """qemu of {name} failed: {why}"""


class SourceError(BlockprovError):
    """cannot read {path}: {why}"""

    exit_code = 6
    http_status = 400


class CannotWrite(BlockprovError):
    """cannot write {path}: {why}"""

    # The write side of SourceError: a missing or read-only directory, a file where a directory is
    # needed, no permission. The user's environment, not a bug: its own code, not 70 (issue 17).
    exit_code = 13
    http_status = 400


class RepositoryUnavailable(BlockprovError):
    """repository {url} is unreachable: {why}"""

    exit_code = 7
    http_status = 503
    transient = True  # down, restarting, a 5xx: it may answer next time


class StaleConnection(BlockprovError):
    """{url} closed an idle connection: {why}"""

    # A request was sent on a keep-alive connection the server had closed meanwhile (repo/remote.py):
    # it goes once more at once. Never leaves repo/remote.py (the socket's own error does).
    transient = True


class PeerBusy(BlockprovError):
    """peer {instance} is busy serving its site ({why}): ask again later or ask the repository"""

    exit_code = 7
    http_status = 503


class CatalogUnavailable(BlockprovError):
    """catalog {url} is unreachable: {why}"""

    exit_code = 7
    http_status = 503
    transient = True  # PostgreSQL down or failing over; a commit's outcome unknown: every write may be repeated


class CatalogMisconfigured(BlockprovError):
    """catalog {url} cannot be used: {why}"""

    # A role without the rights it needs, a read-only standby: retrying cannot help, but to a client
    # of the server it is the server that is unusable (503), as with StoreMisconfigured.
    exit_code = 7
    http_status = 503


class StoreMisconfigured(BlockprovError):
    """object store {url} cannot be used: {why}"""

    # Not temporary (retrying cannot help: a missing bucket, refused credentials), but to a client of
    # the server it is the server that is unusable: 503, and the same exit code as an unreachable one.
    exit_code = 7
    http_status = 503


class TooLarge(BlockprovError):
    """{msg}"""

    exit_code = 2
    http_status = 413


class RequestTimeout(BlockprovError):
    """{msg}"""

    # A client too slow to send its request (service/bounds.py): the connection, not the request.
    exit_code = 7
    http_status = 408
    transient = True  # a slow link or a stalled client: the same request may go through next time


class Busy(BlockprovError):
    """{msg}"""

    # The server holds as many request bodies as it may (service/bounds.py): try again shortly.
    exit_code = 7
    http_status = 503
    transient = True


class AccessDenied(BlockprovError):
    """{msg}"""

    exit_code = 10
    http_status = 403


class Unauthorized(AccessDenied):
    """access denied: {why} (pass a token with --token or BLOCKPROV_TOKEN)"""

    exit_code = 10
    http_status = 401


class Forbidden(AccessDenied):
    """access denied: a {scope} token cannot {action} (that needs a {needed} token)"""

    exit_code = 11
    http_status = 403


class CrossSite(Forbidden):
    """refused: this form was not sent from the console's own page (Origin {origin})"""

    # The console's CSRF check (service/ui/auth.py): a write form posted from another site.


class UntrustedServer(BlockprovError):
    """repository {url} presented an untrusted TLS certificate: {why} (give its CA with --ca FILE)"""

    # Not temporary: retrying or failing over cannot help, so it is not a RepositoryUnavailable.
    exit_code = 7
    http_status = 502


class UpstreamCutBody(BlockprovError):
    """{url} closed the connection before it took the whole body of {what}: {why}"""

    # A site cache passing a body on (service/sitecache.py): the upstream answers a body over its
    # limit for the route with a 413 and closes, and the answer is lost with the connection. Not
    # "unreachable" (issue 27: a hostile client's big body made the site cache say so).
    exit_code = 7
    http_status = 502


class CacheError(BlockprovError):
    """{msg}"""

    exit_code = 8
    http_status = 409


class CacheLocked(CacheError):
    """cache {path} is in use by another agent (pid {pid})"""


class CacheMismatch(CacheError):
    """cache {path} holds {held}, not {wanted}; use another --cache directory"""


class AgentNotRunning(CacheError):
    """no agent is running on {path}"""


class AgentNotAnswering(CacheError):
    """the agent serving {path} did not answer {op} within {seconds} s"""


class AgentDied(BlockprovError):
    """the agent serving {path} died during {op}: {outcome} (see: blockprov status --cache {path})"""

    # Its own code (issue 27): the operation may or may not have taken effect, which a script must
    # tell from a refusal (8) and from a bug (70). ``outcome`` says what is known of it: the CLI
    # looks at the cache (and the repository, for a snapshot) after the agent is gone.
    exit_code = 14
    http_status = 502


class ControlFailed(BlockprovError):
    """{msg}"""

    # An error from an agent's control socket whose class this side does not know (an agent of
    # another version): its message and exit code as the agent sent them.
    def __init__(self, msg: str, exit_code: int) -> None:
        super().__init__(msg=msg)
        self.exit_code = exit_code


class CustomizeFailed(BlockprovError):
    """customizing {name} failed: {why}"""

    # Its own code: the instances were made, but some could not be customized and were not kept.
    exit_code = 9


class InternalError(BlockprovError):
    """internal error: {msg}"""

    # A bug, not a condition the caller can act on: what the edges answer for any exception outside
    # this tree (the CLI's exit code, the service's 500, an agent's control reply).
    exit_code = 70
    http_status = 500


class DeviceError(BlockprovError):
    """{msg}"""

    errno_name = "EIO"


class DeviceIOError(DeviceError):
    """I/O error: {msg}"""


class FetchFailed(DeviceIOError):
    """I/O error: {msg}"""

    # A read of a missing chunk gave up on an unreachable repository: EIO to an NBD client, and to
    # a command (reset --eager, hydrate, update) the unreachable repository's exit code, 7 (issue 17).
    exit_code = 7
    transient = True  # the repository may be back for the next read


class NotHeld(BlockprovError):
    """not held by the site (its peers or its site cache)"""

    # A speculative chunk asked of what the site holds only (cache/fetcher.py, cache/peers.py
    # ``get_held``): it is then fetched for real if a reader wants it, or dropped; never an error a
    # client or a command sees.


class NoSpace(DeviceError):
    """no space left: {msg}"""

    # Its own exit code: a full disk (the repository's, a cache's, an export's destination) is the
    # one failure an operator fixes by freeing space, and scripts tell it from the rest.
    errno_name = "ENOSPC"
    exit_code = 12
    transient = True  # space can be freed (a trim, a removed clone): background work waits for it


class ReadOnlyDevice(DeviceError):
    """the export is read-only"""

    errno_name = "EPERM"


class NotSupported(DeviceError):
    """{msg}"""

    errno_name = "ENOTSUP"


class InvalidRequest(DeviceError):
    """{msg}"""

    errno_name = "EINVAL"


# -- errors across processes ----------------------------------------------------------------------
class NetbootError(BlockprovError):
    """{msg}"""

    exit_code = 1


class HandshakeError(NetbootError):
    """{msg}"""

    # The kernel's NBD client side of a PC could not agree with the agent (netboot/kernelnbd.py).


class NetlinkError(NetbootError):
    """{msg}"""

    # The kernel refused a request to its NBD driver's netlink family (netboot/nbdlink.py).


class DeviceMapperError(NetbootError):
    """{msg}"""

    # dmsetup or a thin-provisioning tool refused or failed while the native data path was set
    # up or read (netboot/dm.py).


class DiskRefused(UsageError):
    """{msg}"""


def error_to_dict(exc: BaseException) -> dict[str, Any]:
    """The JSON an error travels as: ``{"error": ClassName, "message", "details", "exit_code"}``.

    ``details`` holds the template fields (plain values only), so ``error_from_dict`` rebuilds the
    very error; an exception outside this tree travels as an ``InternalError`` naming it."""
    if not isinstance(exc, BlockprovError):
        exc = InternalError(msg=f"{type(exc).__name__}: {exc}")
    details = {k: _plain(v) for k, v in exc.kwargs.items() if isinstance(v, str | int | float | bool) or v is None}
    body: dict[str, Any] = {"error": type(exc).__name__, "message": _plain(exc.message), "details": details,
                            "exit_code": exc.exit_code}
    if isinstance(exc, MissingChunks):
        body["missing"] = exc.missing
    return body


def _plain(v: Any) -> Any:
    """``v`` as any JSON encoder takes it: a message may quote what a client sent (a name with a
    lone surrogate, a number out of range), and an error that cannot be encoded would itself
    become a 500 (issue 27)."""
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, float) and v - v != 0:  # NaN or infinity
        return str(v)
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 63:
        return f"(an integer of {v.bit_length()} bits)"
    return v


def error_from_dict(body: Mapping[str, Any], default: Callable[[str], BlockprovError]) -> BlockprovError:
    """The error ``error_to_dict`` made, rebuilt as its class; ``default(message)`` when this side
    does not know the class or cannot rebuild it (a peer of another version)."""
    name = body.get("error")
    message = str(body.get("message") or name or "")
    cls = globals().get(name) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, BlockprovError):
        if cls is MissingChunks:
            return MissingChunks([str(m) for m in body.get("missing") or []])
        details = body.get("details")
        try:
            return cls(**details) if isinstance(details, dict) and details else cls(message)
        except TypeError:
            pass
    return default(message)
