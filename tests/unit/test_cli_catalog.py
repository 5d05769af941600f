"""``--catalog`` / ``BLOCKPROV_CATALOG`` on bad input, through the real command: a scheme we do not
speak is a usage error naming the accepted forms (exit 2); a PostgreSQL nobody listens on is one
line saying the catalog is unreachable (exit 7), at once rather than after a retry period (the
test's timeout is the bound, never a measured time); a database that does not exist is a clear
error too. ``sqlite``, the default spelled out, keeps working.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli
from tests.pgfixture import Postgres


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockprov: error: "), stderr
    return lines[0]


def test_unknown_scheme_is_a_usage_error(tmp_path: Path) -> None:
    p = run_cli("--catalog", "mysql://x", "images", data=tmp_path / "data", check=False)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert "mysql://x" in line and "sqlite" in line and "postgresql://" in line, line
    # the environment variable is the same option
    p = run_cli("images", data=tmp_path / "data", env={"BLOCKPROV_CATALOG": "mysql://x"}, check=False)
    assert p.returncode == 2 and "postgresql://" in p.stderr, p.stderr


def test_sqlite_spelled_out_is_the_default(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()  # read commands refuse a --data directory that does not exist (issue 17)
    assert run_cli("--catalog", "sqlite", "images", "--json", data=data).stdout.strip() == "[]"
    assert (data / "catalog.sqlite").exists()


def test_unreachable_postgres_fails_at_once(tmp_path: Path) -> None:
    """"At once": the refused connection itself is the answer (PostgreSQL's own reason), not a
    connection pool that waited for one and gave up. Told by the message, not by a clock: the
    machine may be loaded (issue 27: no test expects a command to end within a few seconds)."""
    url = "postgresql://postgres@127.0.0.1:1/x"
    p = run_cli("--catalog", url, "images", data=tmp_path / "data", check=False)
    assert p.returncode == 7, (p.stdout, p.stderr)
    line = one_error_line(p.stderr)
    assert "catalog" in line and "unreachable" in line and "127.0.0.1:1" in line, line
    assert "Connection refused" in line and "couldn't get a connection" not in line, line
    assert "Traceback" not in p.stderr


def test_missing_database_is_a_clear_error(tmp_path: Path, postgres: Postgres) -> None:
    url = postgres.url("bp_no_such_database")
    p = run_cli("--catalog", url, "images", data=tmp_path / "data", check=False)
    assert p.returncode != 0, (p.stdout, p.stderr)
    line = one_error_line(p.stderr)
    assert "catalog" in line and "bp_no_such_database" in line and "does not exist" in line, line


def test_role_without_rights_and_standby_are_clear_errors(tmp_path: Path, postgres: Postgres) -> None:
    """The two set-up mistakes PostgreSQL 15 makes easy: a role that may not create tables in the
    database's schema (PUBLIC lost CREATE on ``public`` in 15), and a read-only database (a standby)."""
    import uuid

    import psycopg

    role, db = f"bp_role_{uuid.uuid4().hex[:8]}", f"bp_db_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.url(), autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"CREATE DATABASE {db}")
    p = run_cli("--catalog", f"postgresql://{role}@127.0.0.1:{postgres.port}/{db}", "images", data=tmp_path / "a",
                check=False)
    assert p.returncode == 7, (p.stdout, p.stderr)
    line = one_error_line(p.stderr)
    assert "cannot be used" in line and "permission denied" in line and "CREATE" in line, line

    with psycopg.connect(postgres.url(), autocommit=True) as c:
        c.execute(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
    p = run_cli("--catalog", postgres.url(db), "images", data=tmp_path / "b", check=False)
    assert p.returncode == 7, (p.stdout, p.stderr)
    line = one_error_line(p.stderr)
    assert "read-only" in line and "standby" in line, line
