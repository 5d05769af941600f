"""Names are validated in one place: image names, tags, version ids, references, host ids, and
the addresses operators type (``HOST:PORT`` listeners, unix socket paths).

"No crap in, no crap out": anything that becomes a path component, a URL segment or an SQL value
passes through here first, so traversal (``..``, ``/``) and surprises never reach storage.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from blockprov.errors import InvalidName, UsageError

# Every pattern is applied with ``fullmatch``: ``re.match`` with ``$`` also accepts the name
# followed by one newline ("pc1\n"), which would reach boot scripts, URLs and the catalog (issue 27).
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VID = re.compile(r"[0-9a-f]{16}")
DEFAULT_TAG = "latest"


def image_name(s: str) -> str:
    if not _NAME.fullmatch(s) or ".." in s:
        raise InvalidName(kind="image name", name=s,
                          why="use lower-case letters, digits, '.', '_' and '-' (at most 128), "
                              "starting with a letter or digit")
    return s


def tag_name(s: str) -> str:
    if not _TAG.fullmatch(s) or ".." in s:
        raise InvalidName(kind="tag", name=s,
                          why="use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit")
    return s


def version_id(s: str) -> str:
    if not _VID.fullmatch(s):
        raise InvalidName(kind="version id", name=s, why="must be 16 lower-case hex digits")
    return s


@dataclass(frozen=True)
class Ref:
    """``NAME:TAG`` (movable) or ``NAME@ID`` (immutable); plain ``NAME`` means ``NAME:latest``."""

    name: str
    tag: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else f"{self.name}:{self.tag}"


def parse_ref(s: str, *, allow_version: bool = True) -> Ref:
    if "@" in s:
        if not allow_version:
            raise InvalidName(kind="reference", name=s, why="expected NAME:TAG here, not NAME@ID")
        name, vid = s.split("@", 1)
        return Ref(image_name(name), version=version_id(vid))
    if ":" in s:
        name, tag = s.split(":", 1)
        return Ref(image_name(name), tag=tag_name(tag))
    return Ref(image_name(s), tag=DEFAULT_TAG)


# -- machines: hosts, kernel arguments, agent instances, requests ----------------------------------
_MAC = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}")
_HOST = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OP = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_RID = re.compile(r"[0-9a-f]{16}")
_ARGS = re.compile(r"[A-Za-z0-9 ._,:=/+@%~-]*")
_BASE_URL = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?|"
                       r"https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")
MAX_ARGS = 2048


def host_id(s: str) -> str:
    """A host as the repository keys it: a MAC address in lower-case colon form, or a host id.

    iPXE sends ``${net0/mac}`` as ``52:54:00:12:34:56``; operators paste ``52-54-00-12-34-56``
    from Windows tools. Both (any case) are the same MAC, so both become the colon form. Anything
    else must be a host id: lower-case letters, digits and '-', like a DNS label (at most 63).
    A dash-separated MAC is read as a MAC, never as a host id."""
    if _MAC.fullmatch(s):
        return s.lower().replace("-", ":")
    if not _HOST.fullmatch(s):
        raise InvalidName(kind="host", name=s[:80],
                          why="give a MAC address (aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff) or a host id "
                              "of lower-case letters, digits and '-' (at most 63), starting with a letter or digit")
    return s


def kernel_args(s: str) -> str:
    """Kernel command-line text that goes into a boot script verbatim.

    It becomes part of an iPXE script line, so anything iPXE would interpret (newlines, ``$``
    expansions, ``||``/``&&``, quotes, ``#``) is refused rather than escaped: letters, digits, space
    and ``._,:=/+@%~-`` cover real kernel arguments (``console=ttyS0,115200n8 root=/dev/vda1 rw``)."""
    if len(s) > MAX_ARGS or not _ARGS.fullmatch(s):
        raise InvalidName(kind="kernel arguments", name=s[:80],
                          why=f"use letters, digits, spaces and ._,:=/+@%~- only (at most {MAX_ARGS} characters)")
    return " ".join(s.split())


def base_url(s: str) -> str:
    """An http(s) URL without query, credentials or odd characters: it is written into boot scripts."""
    s = s.rstrip("/")
    if not _BASE_URL.fullmatch(s):
        raise InvalidName(kind="base URL", name=s[:80],
                          why="expected http://HOST[:PORT][/PATH] with plain characters only")
    return s


def instance_id(s: str) -> str:
    """An agent instance id: letters, digits, '.', '_' and '-' (at most 128), as agents choose them."""
    if not _INSTANCE.fullmatch(s) or ".." in s:
        raise InvalidName(kind="agent instance", name=s[:80],
                          why="use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit")
    return s


def op_name(s: str) -> str:
    """The operation of a repository-initiated request (``snapshot``, ``status`` …)."""
    if not _OP.fullmatch(s):
        raise InvalidName(kind="request operation", name=s[:80],
                          why="use lower-case letters, digits, '.', '_' and '-' (at most 64), starting with a letter")
    return s


def request_id(s: str) -> str:
    if not _RID.fullmatch(s):
        raise InvalidName(kind="request id", name=s[:80], why="must be 16 lower-case hex digits")
    return s


_SITE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def site_name(s: str) -> str:
    """A site's name (a café, a classroom: the group of hosts and agents that share chunks)."""
    if not _SITE.fullmatch(s) or ".." in s:
        raise InvalidName(kind="site name", name=s[:80],
                          why="use lower-case letters, digits, '.', '_' and '-' (at most 64), "
                              "starting with a letter or digit")
    return s


_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def token_name(s: str) -> str:
    """An access token's name (who or what holds it): it is shown in lists and logs, never a secret."""
    if not _TOKEN_NAME.fullmatch(s):
        raise InvalidName(kind="token name", name=s[:80],
                          why="use letters, digits and '._@-' (at most 64), starting with a letter or digit")
    return s


UNIX_PATH_MAX = 107  # bytes: sun_path holds 108 with the terminating NUL


def unix_socket_path(path: str) -> str:
    """A path a unix socket can be bound to and reached at by any client (qemu, nbdinfo): the
    kernel's address holds at most ``UNIX_PATH_MAX`` bytes."""
    n = len(path.encode(sys.getfilesystemencoding(), "surrogateescape"))  # os.fsencode, without os
    if n > UNIX_PATH_MAX:
        raise InvalidName(kind="unix socket path", name=path,
                          why=f"it is {n} bytes and a unix socket's path holds at most {UNIX_PATH_MAX}: "
                              "choose a shorter one")
    return path


# -- names on an agent's host: clones, pools, snapshot targets -------------------------------------
_CLONE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_POOL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9][A-Za-z0-9-]*")
_TARGET = re.compile(r"[A-Za-z0-9_-]{1,64}")


def clone_name(s: str) -> str:
    """A clone (an instance of a clones directory, a VM): an export name and a directory name."""
    if not _CLONE.fullmatch(s):
        raise InvalidName(kind="instance name", name=s[:80],
                          why="use 1-63 lower-case letters, digits or '-', starting with a letter or digit")
    return s


def pool_name(s: str) -> str:
    """A pool: the directory DATA/pools/NAME."""
    if not _POOL.fullmatch(s):
        raise InvalidName(kind="pool name", name=s[:80], why="use letters, digits and '-'")
    return s


def target_name(s: str) -> str:
    """A snapshot target: what a snapshot's unsynced bits are kept for (a cache's metadata)."""
    if not _TARGET.fullmatch(s) or not s.replace("-", "").replace("_", ""):
        raise InvalidName(kind="snapshot target", name=s[:80], why="use 1-64 letters, digits, '-' or '_'")
    return s


# -- listeners: HOST:PORT ------------------------------------------------------------------------
# One parser for every listener option (serve --listen, attach --listen / --metrics, clones serve and
# pool serve --listen), so each accepts the same forms and refuses the same mistakes with the same
# message: a name or IPv4 address (127.0.0.1:8420), an IPv6 address in brackets ([::1]:8420, as URLs
# write it: without brackets the port cannot be told from the address), a port from 0 (any free
# one, reported once bound) to 65535. Parsing only: nothing here resolves or binds.
MAX_PORT = 65535


def host_port(text: str, option: str = "--listen") -> tuple[str, int]:
    """``"HOST:PORT"`` → ``(host, port)``, an IPv6 host without its brackets (as ``bind`` wants it).

    ``option`` names the option in the message, so the operator knows which value to fix."""
    usage = f"{option} must be HOST:PORT (an IPv6 address in brackets, [::1]:8420), not {text!r}"
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port:
        raise UsageError(usage)
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or len(host) < 3 or ":" not in host:
            raise UsageError(usage)
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{option}: put an IPv6 address in brackets, [{host}]:{port}, not {text!r}")
    if any(c.isspace() or c in "[]/" for c in host):
        raise UsageError(usage)
    if not (port.isascii() and port.isdigit()) or int(port) > MAX_PORT:
        raise UsageError(f"{option}: the port must be a number from 0 to {MAX_PORT} (0 picks a free one), "
                         f"not {port!r}")
    return host, int(port)
