"""Inserting many rows of one table without SQLAlchemy's per-row parameter machinery."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, Connection, Table
from sqlalchemy.engine import Dialect

Row = Mapping[str, Any]
Processor = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    sql: str
    positional: bool
    binds: list[tuple[str, Processor | None]]


class BulkInsert:
    """An ``INSERT`` compiled once per column set, its rows converted by the column types.

    Core's ``executemany`` rebuilds a parameter dictionary and walks every bind for every row,
    a tenth of the persister's time at ten thousand events a second. The statement text and each
    column's bind processor are the ones Core itself uses: the driver gets the same values.
    """

    def __init__(self, table: Table, dialect: Dialect, *, serialized: Sequence[str] = ()) -> None:
        """``serialized``: JSON columns whose rows bring the JSON text already (no second pass)."""
        self.table = table
        self.dialect = dialect
        self.serialized = frozenset(serialized)
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def _plan(self, keys: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(keys)
        if plan is None:
            compiled = self.table.insert().compile(dialect=self.dialect, column_keys=list(keys))
            names = list(compiled.positiontup or []) if compiled.positional else list(keys)
            binds: list[tuple[str, Processor | None]] = []
            for name in names:
                impl = self.table.c[name].type.dialect_impl(self.dialect)
                raw = name in self.serialized
                binds.append((name, None if raw else impl.bind_processor(self.dialect)))
            plan = self._plans[keys] = _Plan(str(compiled), compiled.positional, binds)
        return plan

    def execute(self, conn: Connection, rows: Sequence[Row]) -> None:
        """Insert ``rows`` (dicts with the same keys) in one ``executemany``."""
        if not rows:
            return
        plan = self._plan(tuple(rows[0]))
        binds = plan.binds
        params: list[Any]
        if plan.positional:
            params = [tuple(r[n] if p is None else p(r[n]) for n, p in binds) for r in rows]
        else:
            params = [{n: r[n] if p is None else p(r[n]) for n, p in binds} for r in rows]
        conn.exec_driver_sql(plan.sql, params)


class KeyLookup:
    """Which of many values a column already holds: ``SELECT col … WHERE col IN (…)`` per chunk.

    Core renders an expanding ``IN`` afresh on every call (a third of a millisecond for a few
    hundred values); here the text is compiled once per length, as Core would write it. Lengths
    are rounded up to a power of two (the list padded with its first value), so a stream of
    batches of every size needs a handful of statements.
    """

    def __init__(self, column: Column[Any], dialect: Dialect, *, chunk: int = 500) -> None:
        self.column = column
        self.dialect = dialect
        self.chunk = chunk
        self._sql: dict[int, tuple[str, bool]] = {}

    def _compiled(self, n: int) -> tuple[str, bool]:
        found = self._sql.get(n)
        if found is None:
            names = [f"k{i}" for i in range(n)]
            stmt = sa.select(self.column).where(self.column.in_([sa.bindparam(k) for k in names]))
            compiled = stmt.compile(dialect=self.dialect)
            if compiled.positional and list(compiled.positiontup or []) != names:
                raise RuntimeError("unexpected parameter order in a compiled IN lookup")
            found = self._sql[n] = (str(compiled), compiled.positional)
        return found

    def existing(self, conn: Connection, values: Sequence[Any]) -> set[Any]:
        """The subset of ``values`` present in the column."""
        found: set[Any] = set()
        for start in range(0, len(values), self.chunk):
            part = list(values[start : start + self.chunk])
            size = min(self.chunk, 1 << max(0, len(part) - 1).bit_length())
            part += part[:1] * (size - len(part))
            sql, positional = self._compiled(size)
            params: Any = tuple(part) if positional else {f"k{i}": v for i, v in enumerate(part)}
            found.update(row[0] for row in conn.exec_driver_sql(sql, params))
        return found
