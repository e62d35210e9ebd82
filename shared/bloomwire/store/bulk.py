"""Inserting many rows of one table without SQLAlchemy's per-row parameter machinery."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table
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
