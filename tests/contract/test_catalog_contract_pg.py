"""The repository and machines contract suites again, with the catalog in PostgreSQL.

``pg-local`` is ``LocalRepository(..., catalog=PostgreSQL)`` in-process; ``pg-remote`` puts the real
app in front of it (RemoteRepository over Starlette's TestClient). Every test of both base modules
that takes ``be`` is taken over as it is, so a catalog behaviour added there is checked here too.
Token storage (auth.py) gets its own checks below: it shares the catalog's database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import errors
from blockprov.catalog import tokens as auth
from blockprov.catalog.db import open_database
from blockprov.catalog.images import Catalog
from blockprov.catalog.machines import Registry
from blockprov.catalog.postgres import redact
from tests.contract import test_machines_contract as machines
from tests.contract import test_repository_contract as base
from tests.contract.test_repository_contract import Backend

for _module in (base, machines):
    globals().update({k: v for k, v in vars(_module).items()
                      if k not in ("be", "test_schema_migrates_an_existing_catalog",
                                 "test_old_hosts_table_gains_last_boot",
                                 "test_settings_in_old_arguments_move_into_the_record")
                      and (k.startswith("test_") or type(v).__name__ == "FixtureFunctionDefinition")})


@pytest.fixture(params=["pg-local", "pg-remote"])
def be(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Backend]:
    b = Backend("local" if request.param == "pg-local" else "remote", tmp_path, catalog=pg_url)
    yield b
    b.close()


def test_tokens_in_postgres(pg_url: str, tmp_path: Path) -> None:
    cat = Catalog(open_database(pg_url, tmp_path))
    other = Catalog(open_database(pg_url, tmp_path))  # a second server over the same catalog
    try:
        a, b = auth.TokenStore(cat.db), auth.TokenStore(other.db)
        assert not b.any_created()
        token, info = a.create("read", "viewer")
        assert b.lookup(token) == info and b.lookup(token + "x") is None
        with pytest.raises(errors.UsageError, match="exists already"):
            b.create("write", "viewer")
        b.revoke("viewer")
        assert a.lookup(token) is None  # a never cached it: the lookup above was b's
        assert [i.name for i in a.tokens()] == ["viewer"] and a.tokens()[0].revoked is not None
    finally:
        cat.close()
        other.close()


def test_schema_and_timestamps(pg_url: str, tmp_path: Path) -> None:
    """Opening twice creates nothing twice; REAL columns keep sub-second precision (DOUBLE PRECISION)."""
    cat = Catalog(open_database(pg_url, tmp_path))
    try:
        Catalog(cat.db)  # the schema again, over the same database
        _, info = auth.TokenStore(cat.db).create("read")
        stored = cat.db.one("SELECT created FROM tokens WHERE id=?", (info.id,))[0]
        assert stored == info.created
    finally:
        cat.close()


def test_old_hosts_table_gains_last_boot_in_postgres(pg_url: str, tmp_path: Path) -> None:
    """A PostgreSQL catalog whose hosts table predates the last boot gains its columns on open
    (two servers opening it: added once), keeping its hosts."""
    db = open_database(pg_url, tmp_path)
    db.script(machines.OLD_HOSTS.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    db.write("INSERT INTO hosts VALUES ('pc9', 'old', 'v1', NULL, '', 1.0)")
    regs = [Registry(Catalog(db)), Registry(Catalog(open_database(pg_url, tmp_path)))]
    try:
        (h,) = regs[1].hosts()
        assert (h.host, h.last_boot, h.last_boot_version) == ("pc9", None, None)
        regs[0].record_boot("pc9", "a" * 16)
        assert regs[1].hosts()[0].last_boot_version == "a" * 16
    finally:
        for r in regs:
            r.catalog.close()


def test_settings_in_old_arguments_move_into_the_record_in_postgres(pg_url: str, tmp_path: Path) -> None:
    """A PostgreSQL catalog whose hosts kept their policy in their arguments: the words move into
    the host record's columns on open (two servers opening it: moved once)."""
    db = open_database(pg_url, tmp_path)
    db.script(machines.OLD_HOSTS.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    db.write("INSERT INTO hosts VALUES ('pc9', 'old', 'v1', NULL, 'blockprov.hydrate=off blockprov.policy=restore "
             "rw', 1.0)")
    regs = [Registry(Catalog(db)), Registry(Catalog(open_database(pg_url, tmp_path)))]
    try:
        for reg in regs:
            (h,) = reg.hosts()
            assert (h.host, h.policy, h.hydrate, h.args) == ("pc9", "restore", "off", "rw")
    finally:
        for r in regs:
            r.catalog.close()


def test_messages_never_show_the_password() -> None:
    assert redact("postgresql://bp:s3cret@db:5432/bp?sslmode=require") == "postgresql://bp:***@db:5432/bp?sslmode=require"
    assert redact("postgresql://bp@db/bp") == "postgresql://bp@db/bp"
