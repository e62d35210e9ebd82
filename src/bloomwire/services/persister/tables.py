"""Write-behind row caches: the persister keeps its projections in memory and flushes per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

Row = dict[str, Any]


class CachedTable:
    """Rows of one table keyed by primary key; new and changed rows are written on :meth:`flush`.

    The persister is the store's only writer, so the cache is authoritative while it runs. Rows
    missing from memory are read on demand with ``loader``.
    """

    def __init__(self, table: sa.Table, loader: Callable[[str], Row | None] | None = None) -> None:
        self.table = table
        self.key = next(iter(table.primary_key.columns)).name
        self.rows: dict[str, Row] = {}
        self.new: set[str] = set()
        self.dirty: set[str] = set()
        #: Rows read, added or changed since :meth:`take_recent` last ran.
        self.recent: set[str] = set()
        self._loader = loader
        self._columns = [c.name for c in table.columns]
        updatable = [c for c in self._columns if c != self.key]
        self._update = (
            table.update()
            .where(table.c[self.key] == sa.bindparam("k_" + self.key))
            .values({c: sa.bindparam("v_" + c) for c in updatable})
        )

    def get(self, key: str) -> Row | None:
        """The row for ``key`` from memory, else from the store, else None."""
        row = self.rows.get(key)
        if row is None and self._loader is not None:
            row = self._loader(key)
            if row is not None:
                self.rows[key] = row
                self.recent.add(key)
        return row

    def add(self, row: Row) -> Row:
        """Remember a new row (inserted on flush)."""
        key = row[self.key]
        self.rows[key] = row
        self.new.add(key)
        self.recent.add(key)
        return row

    def touch(self, key: str) -> None:
        """Mark a row as changed."""
        if key not in self.new:
            self.dirty.add(key)
        self.recent.add(key)

    def load(self, rows: Iterable[Any]) -> None:
        """Fill the cache from query results."""
        for r in rows:
            row = dict(r._mapping)
            self.rows[row[self.key]] = row

    def values(self) -> Iterator[Row]:
        """Every cached row."""
        return iter(self.rows.values())

    def flush(self, conn: Connection) -> None:
        """Insert new rows and update changed ones."""
        if self.new:
            conn.execute(self.table.insert(), [self._full(self.rows[k]) for k in self.new])
        if self.dirty:
            params = []
            for k in self.dirty:
                row = self.rows[k]
                p = {"v_" + c: row.get(c) for c in self._columns if c != self.key}
                p["k_" + self.key] = k
                params.append(p)
            conn.execute(self._update, params)

    def committed(self) -> None:
        """Forget what was flushed (after a successful commit)."""
        self.new.clear()
        self.dirty.clear()

    def take_recent(self) -> set[str]:
        """The keys of the rows read, added or changed since the last call."""
        recent, self.recent = self.recent, set()
        return recent

    def rolled_back(self) -> None:
        """Drop rows whose changes were not committed; they are re-read on demand."""
        for k in self.new | self.dirty:
            self.rows.pop(k, None)
        self.committed()
        self.recent.clear()

    def evict(self, key: str) -> None:
        """Drop a clean row from memory (e.g. a closed order)."""
        if key not in self.new and key not in self.dirty:
            self.rows.pop(key, None)

    def _full(self, row: Row) -> Row:
        return {c: row.get(c) for c in self._columns}
