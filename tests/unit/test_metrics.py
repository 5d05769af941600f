"""Prometheus metrics of the repository service, in-process: scraped and parsed with
prometheus_client's own parser, so the text format is what Prometheus reads."""

from __future__ import annotations

import warnings
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from blockprov import codec
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from tests.conftest import make_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def test_repository_metrics(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    try:
        import_image(repo, make_image(tmp_path / "a.raw", 2 << 20, seed=5), "lab:v1")
        m = repo.resolve("lab:v1")
        ids = sorted(m.unique_digests())
        with TestClient(create_app(repo)) as c:
            r = c.post("/v1/chunks/fetch", content=b"".join(ids))
            assert r.status_code == 200
            assert c.get(f"/v1/chunks/{ids[0].hex()}").status_code == 200
            etag = c.get(f"/v1/chunks/{ids[0].hex()}").headers["etag"]
            assert c.get(f"/v1/chunks/{ids[0].hex()}", headers={"if-none-match": etag}).status_code == 304
            assert c.get(f"/v1/chunks/{codec.digest(b'absent').hex()}").status_code == 404
            assert c.get("/v1/no/such/thing").status_code == 404
            for _ in range(3):
                c.get("/v1/images/lab/manifest", params={"ref": "v1"})
            data = b"metrics test chunk" * 100
            c.put(f"/v1/chunks/{codec.digest(data).hex()}", content=codec.encode(data))
            text = c.get("/metrics").text
        got = samples(text)
        fetch = {"method": "POST", "route": "/v1/chunks/fetch"}
        assert value(got, "blockprov_http_requests_total", status="200", **fetch) == 1
        assert value(got, "blockprov_http_requests_total", method="GET", route="/v1/chunks/{cid}", status="200") == 2
        assert value(got, "blockprov_http_requests_total", method="GET", route="/v1/chunks/{cid}", status="404") == 1
        # unknown paths share one label: a client cannot grow the label set
        assert value(got, "blockprov_http_requests_total", method="GET", route="(unmatched)", status="404") == 1
        assert value(got, "blockprov_http_received_bytes_total", route="/v1/chunks/fetch") == 32 * len(ids)
        assert value(got, "blockprov_http_sent_bytes_total", route="/v1/chunks/fetch") == len(r.content)
        assert value(got, "blockprov_http_request_duration_seconds_count", **fetch) == 1
        assert value(got, "blockprov_chunks_served_total") == len(ids) + 2
        assert value(got, "blockprov_chunk_fetches_total") == 1
        assert value(got, "blockprov_chunks_not_modified_total") == 1
        assert value(got, "blockprov_chunks_received_total") == 1
        assert value(got, "blockprov_chunks_stored_new_total") == 1
        assert value(got, "blockprov_http_errors_total", error="ChunkMissing") == 1
        assert value(got, "blockprov_http_errors_total", error="NotFound") == 1
        assert value(got, "blockprov_manifest_cache_hits_total") >= 2
        assert value(got, "process_cpu_seconds_total") > 0
    finally:
        repo.close()
