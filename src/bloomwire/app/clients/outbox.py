"""A sender's on-disk outbox: every event stays here until the backbone confirms it.

One SQLite file per rider (WAL, ``synchronous=NORMAL``: a committed row survives the app being
killed; only an OS crash or power cut can lose the last few). An event is written here *before*
it is published; the persister's ack on ``riders/R/inbox/acks`` (its ids are committed to the
store) deletes it, a refusal on ``riders/R/inbox/errors`` moves it to ``refused``. Anything still
here is published again after a reconnect and when the app starts again; the persister dedupes by
event id, so a re-send can never store an event twice.

Positions are the exception: only the newest one is kept, and it is dropped once stale.
Status changes, incidents, chat and offer replies are never dropped.

Shop terminals and customer trackers keep one too (their confirmation is the canonical echo or
the ack on ``customers/C/inbox/acks``; see :mod:`bloomwire.app.clients.sender`).

Several processes may open the same outbox (the running ``rider run`` app and a one-shot
``rider status`` command); :meth:`Outbox.lock` tells them apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCATION = "location"
#: A delivery photo (issue 16): its payload is the image's bytes, not JSON.
PHOTO = "photo"
#: Kinds of event the outbox holds; every kind but ``location`` is an event of record. Shop
#: terminals keep their commands under the command's name (``create-order``, ``assign`` …).
KINDS = (
    "status",
    "incident",
    "chat",
    "reply",
    PHOTO,
    LOCATION,
    "create-order",
    "cancel-order",
    "assign",
    "ack-alert",
    "amend-order",
    "confirm",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS refused (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One event waiting for its ack."""

    seq: int
    id: str
    kind: str
    topic: str
    payload: bytes
    created_at: float
    sent_at: float | None
    attempts: int


class Outbox:
    """One sender's outbox file (``:memory:`` for one that lives as long as the process)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)
        self._lock_file: IO[str] | None = None

    # --- writing ----------------------------------------------------------------------------

    def add(self, event_id: str, kind: str, topic: str, payload: bytes, *, now: float | None = None) -> None:
        """Keep an event (committed before this returns). A newer position replaces older ones."""
        if kind not in KINDS:
            raise ValueError(f"unknown outbox kind {kind!r}")
        at = time.time() if now is None else now
        with self._tx():
            if kind == LOCATION:
                self._db.execute("DELETE FROM outbox WHERE kind = ?", (LOCATION,))
            self._db.execute(
                "INSERT OR IGNORE INTO outbox (id, kind, topic, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                (event_id, kind, topic, payload, at),
            )

    def mark_sent(self, ids: list[str], *, now: float | None = None) -> None:
        """Record that these events were (re)published."""
        if not ids:
            return
        at = time.time() if now is None else now
        with self._tx():
            self._db.executemany(
                "UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE id = ?",
                [(at, i) for i in ids],
            )

    def ack(self, ids: list[str]) -> list[Entry]:
        """The persister committed these ids: forget them; return the entries that were here."""
        if not ids:
            return []
        with self._tx():
            marks = ",".join("?" * len(ids))
            found = self._select(f"WHERE id IN ({marks})", ids)
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
        return found

    def refuse(self, event_id: str, reason: str, *, now: float | None = None) -> Entry | None:
        """The persister refused this event: move it out of the outbox, keeping the reason."""
        at = time.time() if now is None else now
        with self._tx():
            found = self._select("WHERE id = ?", [event_id])
            if not found:
                return None
            entry = found[0]
            self._db.execute("DELETE FROM outbox WHERE id = ?", (event_id,))
            self._db.execute(
                "INSERT OR REPLACE INTO refused (id, kind, topic, reason, at) VALUES (?, ?, ?, ?, ?)",
                (event_id, entry.kind, entry.topic, reason, at),
            )
        return entry

    def drop_stale_positions(self, max_age_s: float, *, now: float | None = None) -> int:
        """Forget positions older than ``max_age_s``; return how many."""
        at = time.time() if now is None else now
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM outbox WHERE kind = ? AND created_at < ?", (LOCATION, at - max_age_s)
            )
        return cur.rowcount

    # --- reading ------------------------------------------------------------------------------

    def pending(self) -> list[Entry]:
        """Every unacknowledged event, oldest first."""
        return self._select("ORDER BY seq", [])

    def unsent(self) -> list[Entry]:
        """Events never published yet (e.g. queued by another process), oldest first."""
        return self._select("WHERE sent_at IS NULL ORDER BY seq", [])

    def due(self, older_than_s: float, *, now: float | None = None) -> list[Entry]:
        """Events published more than ``older_than_s`` ago and still unacknowledged."""
        at = time.time() if now is None else now
        return self._select("WHERE sent_at IS NOT NULL AND sent_at < ? ORDER BY seq", [at - older_than_s])

    def count(self, *, records_only: bool = False) -> int:
        """How many events wait for an ack (optionally not counting the position)."""
        sql = "SELECT COUNT(*) FROM outbox" + (" WHERE kind != ?" if records_only else "")
        row = self._db.execute(sql, (LOCATION,) if records_only else ()).fetchone()
        return int(row[0])

    def refusals(self) -> list[tuple[str, str, str]]:
        """``(id, kind, reason)`` of every refused event, newest first."""
        rows = self._db.execute("SELECT id, kind, reason FROM refused ORDER BY at DESC").fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def _select(self, tail: str, params: Sequence[object]) -> list[Entry]:
        rows = self._db.execute(
            "SELECT seq, id, kind, topic, payload, created_at, sent_at, attempts FROM outbox " + tail,
            params,
        ).fetchall()
        return [
            Entry(int(r[0]), str(r[1]), str(r[2]), str(r[3]), bytes(r[4]), float(r[5]), r[6], int(r[7]))
            for r in rows
        ]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- one sender per outbox ----------------------------------------------------------------

    def lock(self) -> bool:
        """Take the sender lock (held by the running rider app); False if another process has it."""
        if self._lock_file is not None:
            return True
        fh = open(self.path.with_name(self.path.name + ".lock"), "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_file = fh
        return True

    def holder(self) -> str:
        """The pid written by whoever holds the lock (best effort, for messages)."""
        try:
            return self.path.with_name(self.path.name + ".lock").read_text(encoding="utf-8").strip() or "?"
        except OSError:
            return "?"

    def close(self) -> None:
        """Release the lock and close the file."""
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        self._db.close()
