"""The HTTP surface against a hostile client (issue 27 items 7–10): every case a 4xx, nothing stored
that breaks a later read, time and memory bounded across requests.

* ``CASES`` is the table: one request each (the issue's and the variants found while fixing them),
  with the status and error class it must get. After every case the reads that stored poison used
  to break (``READS``: the API's lists and the console's pages, an agent's next request) must still
  answer 200/204, so a value refused on the way in is proven not stored, and one accepted proven
  harmless.
* The bounds (item 9) run against ``blockprov serve`` on a real socket, with raw sockets for the
  trickling client and curl for the client served meanwhile; the figures (seconds to the cut-off,
  RSS growth) are asserted against the configured bounds, never against wall time.
* The console's health page (item 10) is read with tokens of each scope.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.access import AccessPolicy
from blockprov.service.app import create_app
from tests.conftest import make_image

with warnings.catch_warnings():  # starlette 1.x nudges towards httpx2; httpx is what we ship with
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.interop

LONE = "\ud800"  # a lone surrogate: valid JSON (as an escape), not Unicode text
BIG = "1" + "0" * 400  # a 401-digit integer literal
AGENT = "i-hostile"


@dataclass
class Env:
    repo: LocalRepository
    c: TestClient
    vid: str
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("http-hostile")
    repo = LocalRepository(tmp / "repo")
    vid, _ = import_image(repo, make_image(tmp / "a.raw", 1 << 20, seed=3), "lab:v1")
    repo.set_boot_files("lab:v1", b"a kernel", b"an initrd", "console=ttyS0")
    c = TestClient(create_app(repo, access=AccessPolicy(mode="off")))
    assert c.put(f"/v1/agents/{AGENT}", json={"image": "lab", "version": vid}).status_code in (200, 201)
    assert c.put("/v1/hosts/pc1", json={"ref": "lab:v1", "args": "quiet"}).status_code == 200
    yield Env(repo, c, vid, json.loads(c.get("/v1/images/lab/manifest", params={"ref": "v1"}).content))
    c.close()
    repo.close()


def raw_json(value: Any) -> bytes:
    """``value`` as JSON text the way a hostile client writes it: lone surrogates as escapes, and
    the literal ``BIG``/``NaN``/``Infinity`` markers unquoted."""
    text = json.dumps(value)
    for marker in ("NaN", "Infinity", "-Infinity", BIG, "1e400", "1e300", "-1e400"):
        text = text.replace(json.dumps(f"@{marker}"), marker)
    return text.encode()


def manifest_with(env: Env, **fields: Any) -> bytes:
    d = dict(env.manifest)
    d.update(fields)
    return raw_json(d)


# (what, method, path, JSON value or raw bytes, expected status, expected error class)
Case = tuple[str, str, str, Any, int, str]
CASES: list[Case] = [
    # item 7: lone surrogates everywhere a string enters
    ("tag version", "PUT", "/v1/images/lab/tags/t", {"version": LONE}, 400, "UsageError"),
    ("host ref", "PUT", "/v1/hosts/pc2", {"ref": f"lab:{LONE}"}, 400, "UsageError"),
    ("host args", "PUT", "/v1/hosts/pc2", {"ref": "lab:v1", "args": LONE}, 400, "UsageError"),
    ("request op", "POST", f"/v1/agents/{AGENT}/requests", {"op": LONE}, 400, "UsageError"),
    ("request args", "POST", f"/v1/agents/{AGENT}/requests", {"op": "status", "args": {"a": LONE}}, 400,
     "UsageError"),
    ("request args key", "POST", f"/v1/agents/{AGENT}/requests", {"op": "status", "args": {LONE: 1}}, 400,
     "UsageError"),
    ("agent registration", "PUT", f"/v1/agents/{AGENT}", {"image": "lab", "host": LONE}, 400, "UsageError"),
    ("agent registration, nested", "PUT", f"/v1/agents/{AGENT}", {"pools": [{"name": LONE}]}, 400,
     "UsageError"),
    ("boot files cmdline", "PUT", "/v1/images/lab/versions/VID/boot", {"cmdline": LONE}, 400, "UsageError"),
    ("missing ids", "POST", "/v1/chunks/missing", {"ids": [LONE]}, 400, "UsageError"),
    # item 7: numbers no later reader bears, in manifests and agent reports
    ("manifest size 1e400", "POST", "/v1/images/lab/versions", "manifest:size=@1e400", 422, "ManifestError"),
    ("manifest size Infinity", "POST", "/v1/images/lab/versions", "manifest:size=@Infinity", 422, "ManifestError"),
    ("manifest size 401 digits", "POST", "/v1/images/lab/versions", f"manifest:size=@{BIG}", 422, "ManifestError"),
    ("manifest chunk_size 1e400", "POST", "/v1/images/lab/versions", "manifest:chunk_size=@1e400", 422,
     "ManifestError"),
    ("manifest chunk_size 401 digits", "POST", "/v1/images/lab/versions", f"manifest:chunk_size=@{BIG}", 422,
     "ManifestError"),
    ("manifest created NaN", "POST", "/v1/images/lab/versions", "manifest:created=@NaN", 422, "ManifestError"),
    ("manifest created 1e300", "POST", "/v1/images/lab/versions", "manifest:created=@1e300", 422,
     "ManifestError"),
    ("manifest labels surrogate", "POST", "/v1/images/lab/versions", f"manifest:labels.os={LONE}", 422,
     "ManifestError"),
    ("agent report 401-digit modified_chunks", "PUT", f"/v1/agents/{AGENT}", {"modified_chunks": f"@{BIG}"},
     400, "UsageError"),
    ("agent report NaN latency", "PUT", f"/v1/agents/{AGENT}", {"fetch_latency_ms": "@NaN"}, 400, "UsageError"),
    ("request result 1e400", "POST", f"/v1/agents/{AGENT}/requests/RID/result",
     {"ok": True, "result": {"x": "@1e400"}}, 400, "UsageError"),
    ("request error surrogate", "POST", f"/v1/agents/{AGENT}/requests/RID/result",
     {"ok": False, "error": LONE}, 400, "UsageError"),
    # item 8: a trailing newline is no part of a name
    ("tag name with a newline", "PUT", "/v1/images/lab/tags/nl%0A", {"version": "VID"}, 400, "InvalidName"),
    ("host with a newline", "PUT", "/v1/hosts/pc1%0A", {"ref": "lab:v1"}, 400, "InvalidName"),
    ("kernel args with a newline", "PUT", "/v1/hosts/pc3", {"ref": "lab:v1", "args": "quiet\n"}, 400,
     "InvalidName"),
    ("kernel args: an iPXE command after a newline", "PUT", "/v1/hosts/pc3",
     {"ref": "lab:v1", "args": "a\nshell"}, 400, "InvalidName"),
    ("image name with a newline", "GET", "/v1/images/lab%0A/versions", None, 400, "InvalidName"),
    ("agent instance with a newline", "PUT", "/v1/agents/i-x%0A", {"image": "lab"}, 400, "InvalidName"),
    ("request op with a newline", "POST", f"/v1/agents/{AGENT}/requests", {"op": "status\n"}, 400, "InvalidName"),
    ("boot base URL with a newline", "GET", "/v1/boot/pc1?base=http://x%0A", None, 400, "InvalidName"),
    # variants: numbers in query parameters (pydantic reads "nan" and "inf" as floats)
    ("gc grace NaN: would delete uploads in progress", "POST", "/v1/gc?grace=nan", None, 400, "UsageError"),
    ("gc grace negative", "POST", "/v1/gc?grace=-1", None, 400, "UsageError"),
    ("gc grace infinite", "POST", "/v1/gc?grace=inf", None, 400, "UsageError"),
    ("long poll wait NaN", "GET", f"/v1/agents/{AGENT}/requests/next?wait=nan", None, 400, "UsageError"),
]


def _resolve(env: Env, path: str, body: Any) -> tuple[str, bytes | None]:
    path = path.replace("VID", env.vid)
    if "RID" in path:
        r = env.c.post(f"/v1/agents/{AGENT}/requests", json={"op": "status"})
        assert r.status_code == 201, r.text
        path = path.replace("RID", r.json()["id"])
    if body is None:
        return path, None
    if isinstance(body, str) and body.startswith("manifest:"):
        key, _, value = body[len("manifest:"):].partition("=")
        if "." in key:
            outer, inner = key.split(".")
            return path, manifest_with(env, **{outer: {inner: value}})
        return path, manifest_with(env, **{key: value})
    if isinstance(body, dict) and isinstance(body.get("version"), str):
        body = {**body, "version": body["version"].replace("VID", env.vid)}
    return path, raw_json(body)


def reads_still_work(env: Env) -> list[str]:
    """The reads that poison stored by an earlier request used to break; each must still answer."""
    broken = []
    for url in ("/v1/agents", "/v1/hosts", "/v1/images", "/v1/images/lab/versions", "/ui/machines",
                "/ui/images", "/ui/images/lab", "/ui/pools", "/ui/health", "/v1/boot/pc1",
                f"/v1/agents/{AGENT}/requests/next?wait=0"):
        r = env.c.get(url)
        if r.status_code not in (200, 204):
            broken.append(f"GET {url} → {r.status_code}: {r.text[:200]}")
    return broken


@pytest.mark.parametrize(("what", "method", "path", "body", "status", "error"), CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_refused_and_stores_nothing(env: Env, what: str, method: str, path: str, body: Any,
                                                       status: int, error: str) -> None:
    path, content = _resolve(env, path, body)
    r = env.c.request(method, path, content=content,
                      headers={"content-type": "application/json", "accept": "application/json"})
    assert (r.status_code, r.json().get("error")) == (status, error), f"{what}: {r.status_code} {r.text[:300]}"
    assert not (broken := reads_still_work(env)), f"after {what}:\n" + "\n".join(broken)
