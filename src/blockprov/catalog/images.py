"""The catalog: images, versions (their manifests) and tags, in an SQL database (db.py).

The database is SQLite in the data directory by default, or PostgreSQL shared by several servers
(``--catalog postgresql://…``); this code is the same for both.

Crash rules: SQLite in WAL mode with ``synchronous=FULL`` (or PostgreSQL's own log) is our
journal with checksummed records: a commit that returned is durable, one that did not is absent.
Writers from several processes (CLI and servers at once) serialize (db.py); every multi-statement
change runs in one transaction.

Tag history (``tag_history``): promotion and rollback are tag moves, and an operator asks "who
moved prod, and when?", so every change of a tag (set, moved, removed) is recorded in the same
transaction as the change itself, with who did it when the caller knows (the console passes its
token's name). It is a table of its own, not columns of ``tags``: ``CREATE TABLE IF NOT EXISTS``
on open is the catalog's migration (SQLite and PostgreSQL alike), so a catalog made before it
simply gains it, empty, and older servers over the same catalog keep working (their tag moves
are not recorded). Rows have no foreign key: the history outlives a removed version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blockprov.catalog.db import SQLDatabase, Tx
from blockprov.catalog.records import ImageInfo, VersionInfo
from blockprov.errors import Conflict, ImageNotFound, ManifestError
from blockprov.manifest import Manifest
from blockprov.names import Ref, image_name, tag_name, version_id
from blockprov.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    image    TEXT NOT NULL,
    id       TEXT NOT NULL,
    size     INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    created  REAL NOT NULL,
    parent   TEXT,
    labels   TEXT NOT NULL,
    manifest BLOB NOT NULL,
    PRIMARY KEY (image, id)
);
CREATE TABLE IF NOT EXISTS tags (
    image   TEXT NOT NULL,
    tag     TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (image, tag),
    FOREIGN KEY (image, version) REFERENCES versions(image, id)
);
CREATE TABLE IF NOT EXISTS tag_history (
    image    TEXT NOT NULL,
    tag      TEXT NOT NULL,
    version  TEXT,
    previous TEXT,
    who      TEXT,
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tag_history_image ON tag_history (image, at);
"""

SET_TAG = "INSERT INTO tags VALUES (?,?,?) ON CONFLICT (image, tag) DO UPDATE SET version=excluded.version"
HISTORY_SHOWN = 200  # most recent tag changes ``tag_history`` returns


@dataclass(frozen=True)
class TagChange:
    """One change of a tag: ``version`` None when it was removed, ``previous`` None when it was new."""

    image: str
    tag: str
    version: str | None
    previous: str | None
    who: str | None
    at: float


def _record_tag(db: Tx, image: str, tag: str, vid: str | None, who: str | None) -> None:
    """Set (``vid``) or remove (None) a tag, and record the change if there is one."""
    row = db.execute("SELECT version FROM tags WHERE image=? AND tag=?", (image, tag)).fetchone()
    previous = None if row is None else str(row[0])
    if previous == vid:
        return
    if vid is None:
        db.execute("DELETE FROM tags WHERE image=? AND tag=?", (image, tag))
    else:
        db.execute(SET_TAG, (image, tag, vid))
    db.execute("INSERT INTO tag_history VALUES (?,?,?,?,?,?)", (image, tag, vid, previous, who, time.time()))


class Catalog:
    def __init__(self, db: SQLDatabase | str | Path) -> None:
        """``db``: an open database (db.open_database), or the path of an SQLite file."""
        self.db: SQLDatabase = Database(db, timeout=30.0) if isinstance(db, (str, Path)) else db
        self.db.script(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writes ---------------------------------------------------------------------------------
    def add_version(self, m: Manifest, tag: str | None = None, who: str | None = None) -> str:
        raw = m.to_json()
        vid = m.id
        with self.db.tx() as db:
            db.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (m.image, vid, m.size, m.chunk_size, m.created, m.parent,
                 json.dumps(m.labels, sort_keys=True), raw))
            if tag is not None:
                _record_tag(db, m.image, tag_name(tag), vid, who)
        return vid

    def set_tag(self, name: str, tag: str, vid: str, who: str | None = None) -> None:
        """Point ``tag`` at ``vid`` (a promotion or a rollback), recording who did it when known."""
        with self.db.tx() as db:
            if not db.execute("SELECT 1 FROM versions WHERE image=? AND id=?",
                              (image_name(name), version_id(vid))).fetchone():
                raise ImageNotFound(ref=f"{name}@{vid}")
            _record_tag(db, name, tag_name(tag), vid, who)

    def remove(self, ref: Ref, who: str | None = None) -> list[str]:
        with self.db.tx() as db:
            if ref.version is None:
                if not db.execute("SELECT 1 FROM tags WHERE image=? AND tag=?", (ref.name, ref.tag)).fetchone():
                    raise ImageNotFound(ref=str(ref))
                _record_tag(db, ref.name, str(ref.tag), None, who)
                return [str(ref)]
            tags = [r[0] for r in db.execute("SELECT tag FROM tags WHERE image=? AND version=?",
                                             (ref.name, ref.version))]
            for t in tags:
                _record_tag(db, ref.name, t, None, who)
            cur = db.execute("DELETE FROM versions WHERE image=? AND id=?", (ref.name, ref.version))
            if cur.rowcount == 0:
                raise ImageNotFound(ref=str(ref))
            return [f"{ref.name}:{t}" for t in tags] + [str(ref)]

    # -- reads ----------------------------------------------------------------------------------
    def resolve_id(self, ref: Ref, tx: Tx | None = None) -> str:
        """The version ``ref`` names now (inside ``tx`` when given: a writer checking what it changes)."""
        args: tuple[str, str | None]
        if ref.version is not None:
            sql, args = "SELECT id FROM versions WHERE image=? AND id=?", (ref.name, ref.version)
        else:
            sql, args = "SELECT version FROM tags WHERE image=? AND tag=?", (ref.name, ref.tag)
        row = tx.execute(sql, args).fetchone() if tx is not None else self.db.one(sql, args)
        if not row:
            raise ImageNotFound(ref=str(ref))
        return str(row[0])

    def manifest(self, name: str, vid: str) -> Manifest:
        row = self.db.one("SELECT manifest FROM versions WHERE image=? AND id=?", (name, vid))
        if not row:
            raise ImageNotFound(ref=f"{name}@{vid}")
        m = Manifest.from_json(bytes(row[0]))
        if m.id != vid:  # the catalog itself is damaged (or from an incompatible version): never guess
            raise ManifestError(why=f"the catalog's manifest of {name}@{vid} hashes to {m.id}")
        return m

    def images(self) -> list[ImageInfo]:
        db = self.db
        out = []
        for (name,) in db.all("SELECT DISTINCT image FROM versions ORDER BY image"):
            n, latest = db.one(
                "SELECT COUNT(*), (SELECT id FROM versions WHERE image=? ORDER BY created DESC LIMIT 1) "
                "FROM versions WHERE image=?", (name, name))
            tags = dict(db.all("SELECT tag, version FROM tags WHERE image=? ORDER BY tag", (name,)))
            out.append(ImageInfo(name=name, versions=n, tags=tags, latest=latest))
        return out

    def versions(self, name: str) -> list[VersionInfo]:
        rows = self.db.all("SELECT id, size, chunk_size, created, parent, labels FROM versions "
                           "WHERE image=? ORDER BY created", (image_name(name),))
        if not rows:
            raise ImageNotFound(ref=name)
        tags: dict[str, list[str]] = {}
        for tag, vid in self.db.all("SELECT tag, version FROM tags WHERE image=?", (name,)):
            tags.setdefault(vid, []).append(tag)
        return [VersionInfo(image=name, id=r[0], size=r[1], chunk_size=r[2], created=r[3], parent=r[4],
                            labels=json.loads(r[5]), tags=sorted(tags.get(r[0], []))) for r in rows]

    def tag_history(self, name: str | None = None, limit: int = HISTORY_SHOWN) -> list[TagChange]:
        """The most recent tag changes (of one image, or of all), newest first."""
        where, args = ("WHERE image=? ", (image_name(name),)) if name is not None else ("", ())
        rows = self.db.all(f"SELECT image, tag, version, previous, who, at FROM tag_history {where}"
                           f"ORDER BY at DESC LIMIT {int(limit)}", args)
        return [TagChange(*r) for r in rows]

    def all_manifests(self) -> Iterator[Manifest]:
        for (raw,) in self.db.all("SELECT manifest FROM versions"):
            yield Manifest.from_json(bytes(raw))

    def version_exists(self, name: str, vid: str) -> bool:
        return self.db.one("SELECT 1 FROM versions WHERE image=? AND id=?", (name, vid)) is not None

    def check_parent(self, m: Manifest) -> None:
        if m.parent is not None and not self.version_exists(m.image, m.parent):
            raise Conflict(f"parent version {m.image}@{m.parent} does not exist")
