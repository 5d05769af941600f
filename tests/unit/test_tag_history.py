"""Tag history (catalog/images.py ``tag_history``): every set, move and removal of a tag is recorded
with who and when, on SQLite and PostgreSQL, and a catalog made before the table existed opens,
reads as before and starts recording."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockprov.catalog.db import SQLDatabase, open_database
from blockprov.catalog.images import Catalog
from blockprov.manifest import build
from blockprov.names import Ref

# The catalog's schema before tag history (commit f25901b): what an existing catalog holds.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    image TEXT NOT NULL, id TEXT NOT NULL, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL,
    created REAL NOT NULL, parent TEXT, labels TEXT NOT NULL, manifest BLOB NOT NULL, PRIMARY KEY (image, id));
CREATE TABLE IF NOT EXISTS tags (
    image TEXT NOT NULL, tag TEXT NOT NULL, version TEXT NOT NULL, PRIMARY KEY (image, tag),
    FOREIGN KEY (image, version) REFERENCES versions(image, id));
"""


def database(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> SQLDatabase:
    spec = request.getfixturevalue("pg_url") if kind == "postgresql" else None
    return open_database(spec, tmp_path)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_older_catalog_gains_tag_history(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    db = database(kind, tmp_path, request)
    db.script(OLD_SCHEMA)
    m1 = build("lab", 1 << 16, 1 << 16, [b"\1" * 32], created=1.0)
    m2 = build("lab", 1 << 16, 1 << 16, [b"\2" * 32], created=2.0, parent=m1.id)
    with db.tx() as tx:  # written as an older blockprov wrote them
        for m in (m1, m2):
            tx.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?)",
                       (m.image, m.id, m.size, m.chunk_size, m.created, m.parent, "{}", m.to_json()))
        tx.execute("INSERT INTO tags VALUES (?,?,?)", ("lab", "prod", m1.id))
    cat = Catalog(db)  # opening is the migration
    try:
        assert cat.images()[0].tags == {"prod": m1.id}
        assert cat.tag_history() == []
        cat.set_tag("lab", "prod", m2.id, who="admin")  # a promotion
        cat.set_tag("lab", "prod", m2.id, who="admin")  # no change, nothing recorded
        cat.set_tag("lab", "prod", m1.id, who="ops")  # a rollback
        cat.add_version(build("lab", 1 << 16, 1 << 16, [b"\3" * 32], created=3.0), tag="test")
        cat.remove(Ref("lab", tag="test"))
        got = [(h.tag, h.version, h.previous, h.who) for h in cat.tag_history("lab")]
        m3 = build("lab", 1 << 16, 1 << 16, [b"\3" * 32], created=3.0).id
        assert got == [("test", None, m3, None), ("test", m3, None, None),
                       ("prod", m1.id, m2.id, "ops"), ("prod", m2.id, m1.id, "admin")]
        assert all(h.at > 0 for h in cat.tag_history())
        cat.remove(Ref("lab", version=m1.id))  # removing a version records its tags' removal
        last = cat.tag_history("lab")[0]
        assert (last.tag, last.version, last.previous) == ("prod", None, m1.id)
    finally:
        cat.close()
