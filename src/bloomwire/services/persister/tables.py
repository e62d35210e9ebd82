"""Row caches: the persister keeps its projections in memory, one :class:`CachedTable` per table.

Which rows a batch added or changed is the unit of work's business (:mod:`.work`); a table only
holds rows, reads missing ones on demand and writes the ones it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection


class Keyed(Protocol):
    """A row class of the persister's: its primary key is ``id``."""

    id: str


R = TypeVar("R", bound=Keyed)


class CachedTable(Generic[R]):
    """Rows of one table keyed by ``id``, as instances of ``row_type``.

    The persister is the store's only writer, so the cache is authoritative while it runs. Rows
    missing from memory are read on demand from ``engine``, when given.
    """

    def __init__(self, table: sa.Table, row_type: Callable[..., R], engine: sa.Engine | None = None) -> None:
        self.table = table
        self.row_type = row_type
        self.rows: dict[str, R] = {}
        #: Rows read, added or changed since :meth:`take_recent` last ran.
        self.recent: set[str] = set()
        self._engine = engine
        self._columns = [c.name for c in table.columns]
        self._updatable = [c for c in self._columns if c != "id"]
        self._select = sa.select(table).where(table.c.id == sa.bindparam("id"))
        self._update = (
            table.update()
            .where(table.c.id == sa.bindparam("k_id"))
            .values({c: sa.bindparam("v_" + c) for c in self._updatable})
        )

    def get(self, key: str) -> R | None:
        """The row for ``key`` from memory, else from the store, else None."""
        row = self.rows.get(key)
        if row is None and self._engine is not None:
            with self._engine.connect() as conn:
                found = conn.execute(self._select, {"id": key}).first()
            if found is not None:
                row = self.rows[key] = self.row_type(**found._mapping)
                self.recent.add(key)
        return row

    def put(self, row: R) -> R:
        """Hold ``row`` (a new one: the unit of work that made it inserts it)."""
        self.rows[row.id] = row
        self.recent.add(row.id)
        return row

    def load(self, keys: Sequence[str], values: Iterable[Sequence[Any]]) -> None:
        """Fill the cache from rows of ``values`` for the columns ``keys`` (named once: a row's
        ``_mapping`` per row costs more than the row itself at start-up)."""
        make, rows = self.row_type, self.rows
        for v in values:
            row = make(**dict(zip(keys, v, strict=True)))
            rows[row.id] = row

    def values(self) -> Iterator[R]:
        """Every cached row."""
        return iter(self.rows.values())

    def insert(self, conn: Connection, keys: Iterable[str]) -> None:
        """Insert the rows of ``keys``."""
        rows = [{c: getattr(self.rows[k], c) for c in self._columns} for k in keys]
        if rows:
            conn.execute(self.table.insert(), rows)

    def update(self, conn: Connection, keys: Iterable[str]) -> None:
        """Write every column of the rows of ``keys``."""
        params = []
        for k in keys:
            row = self.rows[k]
            p = {"v_" + c: getattr(row, c) for c in self._updatable}
            p["k_id"] = k
            params.append(p)
        if params:
            conn.execute(self._update, params)

    def take_recent(self) -> set[str]:
        """The keys of the rows read, added or changed since the last call."""
        recent, self.recent = self.recent, set()
        return recent

    def forget(self, keys: Iterable[str]) -> None:
        """Drop rows from memory (changes never committed: they are re-read on demand)."""
        for k in keys:
            self.rows.pop(k, None)

    def evict(self, key: str) -> None:
        """Let a row go from memory (a closed order, a resolved alert): read back if named again."""
        self.rows.pop(key, None)

    def clear(self) -> None:
        """Drop every row (before a reload)."""
        self.rows.clear()
        self.recent.clear()
