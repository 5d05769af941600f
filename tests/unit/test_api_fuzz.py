"""Hardening: schemathesis generates requests from the live app's OpenAPI document (valid and
invalid values for every path, query and body) and no answer may be a 5xx (invariant 7: bad input
gets a clear 4xx, never a crash). Bounded: ``EXAMPLES`` cases per operation and generation mode
(~40 operations), in process (no sockets), well under a minute.

The operations are walked by hand with hypothesis instead of schemathesis's pytest plugin, whose
lazy-fixture support does not work with the pytest this project uses.

Shapes a generator from the schema does not reach (issue 17) are sent to every operation of the
same document by ``test_hostile_shapes``, through the raw ASGI interface so header bytes arrive
exactly as a socket would deliver them: JSON nested deeper than Python's recursion limit, JSON
values no later reader bears (lone surrogates, NaN, 1e400, 400-digit integers, not UTF-8), Range
headers with non-ASCII digits or numbers past ``int``'s 4,300-digit limit, a Content-Length of
5,000 digits."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from blockprov.catalog.db import open_database
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.access import AccessPolicy
from blockprov.service.app import create_app
from tests.conftest import make_image

EXAMPLES = 12
MAX_WAIT = 0.2  # long polls: the fuzzer may pick wait=30, which proves nothing and costs 30 s


def _bounded_wait(case: schemathesis.Case) -> None:
    if case.query and "wait" in case.query:
        w = case.query["wait"]
        if isinstance(w, int | float) and not isinstance(w, bool) and w >= 0:
            case.query["wait"] = min(w, MAX_WAIT)


def fuzz(op: schemathesis.APIOperation, mode: GenerationMode) -> list[str]:
    """The first few 5xx answers (with a curl command to replay them) of one operation and mode."""
    seen: list[str] = []

    @given(case=op.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        _bounded_wait(case)
        r = case.call()
        if r.status_code >= 500 and len(seen) < 3:
            seen.append(f"{case.method} {case.formatted_path} ({mode.value}) → {r.status_code}: "
                        f"{r.text[:200]}\n    {case.as_curl_command()}")

    with contextlib.suppress(Unsatisfiable):  # nothing to make invalid (no parameters, in negative mode)
        run()
    return seen


@pytest.mark.parametrize("catalog", ["sqlite", "postgresql"])
def test_no_server_errors(catalog: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Over both catalogs: PostgreSQL refuses some text SQLite keeps (a NUL byte), so each must be fuzzed."""
    spec = request.getfixturevalue("pg_url") if catalog == "postgresql" else None
    repo = LocalRepository(tmp_path / "repo", catalog=open_database(spec, tmp_path / "repo"))
    import_image(repo, make_image(tmp_path / "a.raw", 1 << 20, seed=2), "lab:v1")
    failures: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(repo, access=AccessPolicy(mode="off")))
            ops = [r.ok() for r in schema.get_all_operations()]
            assert len(ops) > 30
            for op in ops:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    failures.extend(fuzz(op, mode))
    finally:
        repo.close()
    assert not failures, "server errors:\n" + "\n".join(failures)


DEEP = 1000  # JSON nesting past Python's recursion limit: the decoder raises RecursionError
HOSTILE_BODIES = [b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP,
                  b'{"ids": ' + b"[" * DEEP + b"]" * DEEP + b"}", b'{"chunks": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                  # issue 27: values a later reader cannot bear, in a field of any name
                  b'{"x": "\\ud800", "ref": "\\ud800", "version": "\\ud800"}', b'{"x": NaN}', b'{"x": 1e400}',
                  b'{"x": ' + b"9" * 400 + b"}", b"\xff\xfe"]
HOSTILE_RANGES = [b"bytes=\xb2-", b"bytes=0-\xb2", b"bytes=-\xb9", b"bytes=\xb9\xb2-\xb3",
                  b"bytes=" + b"9" * 5000 + b"-", b"bytes=0-" + b"9" * 5000, b"bytes=-" + b"9" * 5000]


async def asgi_status(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """The status of one request sent straight to the ASGI app: the header bytes reach it as they are
    (the test client re-encodes them as UTF-8, so "\xb2" would arrive as "Â²")."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"wait=0",
             "root_path": "", "headers": [(b"host", b"testserver"), *headers],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    given_body = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal given_body
        if not given_body:
            given_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the answer runs to its end
        raise AssertionError("unreachable")

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            status.append(msg["status"])

    try:
        await app(scope, receive, send)
    except Exception:  # what escapes the app, the server answers 500 (if it still can)
        return 500
    return status[0]


def test_hostile_shapes(tmp_path: Path) -> None:
    """Every operation of the OpenAPI document, with its path filled with names that exist, gets the
    shapes of issue 17; none may answer 5xx."""
    repo = LocalRepository(tmp_path / "repo")
    vid, _ = import_image(repo, make_image(tmp_path / "a.raw", 1 << 20, seed=2, data_fraction=1.0), "lab:v1")
    m = repo.resolve("lab:v1")
    stored = next(m.digest_at(i) for i in range(m.count) if not m.is_zero(i))
    names = {"name": "lab", "ref": "v1", "vid": vid, "tag": "v1", "cid": stored.hex(), "instance": "i-fuzz",
             "rid": "1", "host": "h1", "which": "kernel", "site": "s1"}
    app = create_app(repo, access=AccessPolicy(mode="off"))
    failures: list[str] = []

    async def walk() -> None:
        for template, ops in app.openapi()["paths"].items():
            path = template.format(**names)
            for method, op in ops.items():
                shapes: list[tuple[str, list[tuple[bytes, bytes]], bytes]] = []
                if method in ("get", "head"):
                    shapes += [(f"Range {r[:20]!r}", [(b"range", r)], b"") for r in HOSTILE_RANGES]
                if "requestBody" in op:
                    shapes += [(f"JSON {b[:12]!r}…", [(b"content-type", b"application/json"),
                                                     (b"content-length", str(len(b)).encode())], b)
                               for b in HOSTILE_BODIES]
                    shapes.append(("Content-Length of 5000 digits", [(b"content-length", b"9" * 5000)], b""))
                for what, headers, body in shapes:
                    status = await asgi_status(app, method.upper(), path, headers, body)
                    if status >= 500:
                        failures.append(f"{method.upper()} {path} with {what} → {status}")

    try:
        asyncio.run(walk())
    finally:
        app.state.service.close()
        repo.close()
    assert not failures, "server errors:\n" + "\n".join(failures)
