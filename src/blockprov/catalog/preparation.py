"""Where each version's boot profile preparation stands (issue 26 item 0), in the catalog.

A version that gets boot files is booted once, headless, on the repository's host to record its
boot profile before any machine boots it (vm/prepare.py); ``show`` and the console say whether its
profile is ready. The process that prepares it (``blockprov profile prepare``, started in the
background) writes its state here, so every server over the catalog and every client sees it:

* ``queued``: waiting for the one preparation at a time;
* ``running``: booting it now;
* ``done``: a profile was saved (``detail``: how many chunks, how the boot ended);
* ``skipped``: none was needed (it inherits one) or none can be made here (no qemu on the host);
* ``failed``: the boot read nothing, or qemu failed (``detail`` says why).

One row per version, gone with it (``ON DELETE CASCADE``). Crash rules: each change is one
statement; a preparation killed mid-way leaves ``running``, which ``stale`` reports as failed once
it is older than the longest a boot may take.
"""

from __future__ import annotations

import time
from typing import Any

from blockprov.catalog.db import SQLDatabase
from blockprov.errors import UsageError
from blockprov.names import image_name, version_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS profile_prep (
    image   TEXT NOT NULL,
    version TEXT NOT NULL,
    state   TEXT NOT NULL,
    detail  TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (image, version),
    FOREIGN KEY (image, version) REFERENCES versions(image, id) ON DELETE CASCADE
);
"""

STATES = ("queued", "running", "done", "skipped", "failed")
STALE_SECONDS = 3600.0  # a running preparation not heard of for this long died (its boot's timeout is 600 s)


class Preparations:
    def __init__(self, db: SQLDatabase) -> None:
        self.db = db
        self.db.script(SCHEMA)

    def set(self, image: str, vid: str, state: str, detail: str | None = None) -> None:
        if state not in STATES:
            raise UsageError(f"a preparation's state is one of {', '.join(STATES)}, not {state!r}")
        self.db.write("INSERT INTO profile_prep VALUES (?,?,?,?,?) ON CONFLICT (image, version) DO UPDATE SET "
                      "state=excluded.state, detail=excluded.detail, updated=excluded.updated",
                      (image_name(image), version_id(vid), state, (detail or "")[:2000] or None, time.time()))

    def get(self, image: str, vid: str) -> dict[str, Any] | None:
        row = self.db.one("SELECT state, detail, updated FROM profile_prep WHERE image=? AND version=?",
                          (image_name(image), version_id(vid)))
        if row is None:
            return None
        state, detail, updated = row
        if state in ("queued", "running") and time.time() - float(updated) > STALE_SECONDS:
            state, detail = "failed", f"the preparation stopped while {state} ({detail or 'no detail'})"
        return {"state": state, "detail": detail, "updated": float(updated)}
