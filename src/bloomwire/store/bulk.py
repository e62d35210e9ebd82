"""Inserting many rows of one table without SQLAlchemy's per-row parameter machinery."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, Connection, Table
from sqlalchemy.engine import Dialect

from bloomwire.store.models import UTCDateTime

Row = Mapping[str, Any]
Processor = Callable[[Any], Any]
#: Converted values by value, shared by the inserts of one transaction (a batch's rows share
#: their ``recorded_at``; a chat line's ``at`` is its event's ``time``).
Memo = dict[Any, Any]

_SAMPLE_TIMES = (
    datetime(2026, 2, 14, 9, 30, 5, 123456, tzinfo=UTC),
    datetime(2026, 2, 14, 9, 30, 5, tzinfo=timezone(timedelta(hours=-5))),
    datetime(9, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
)


def _sqlite_utc(value: datetime | None) -> str | None:
    """An aware time as SQLite's ``DATETIME`` text in UTC: what :class:`~.models.UTCDateTime`
    and the dialect's processor make together, in one call (a third of the time)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store; use timezone-aware UTC")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _processor(column: Column[Any], dialect: Dialect) -> tuple[Processor | None, bool]:
    """The column's bind processor (Core's own), and whether its values may be memoised: a UTC
    time on SQLite gets :func:`_sqlite_utc` when it writes exactly what Core writes."""
    impl = column.type.dialect_impl(dialect)
    core = impl.bind_processor(dialect)
    sqlite_utc = core is not None and dialect.name == "sqlite" and isinstance(column.type, UTCDateTime)
    if sqlite_utc and all(core(t) == _sqlite_utc(t) for t in _SAMPLE_TIMES):  # type: ignore[misc]
        return _sqlite_utc, True
    return core, False


@dataclass(frozen=True, slots=True)
class _Plan:
    sql: str
    positional: bool
    names: list[str]
    #: (position in ``names``, processor, memoised) of the columns that are converted
    converted: list[tuple[int, Processor, bool]]


def _convert(values: list[Any], process: Processor, memo: Memo | None) -> list[Any]:
    if memo is None:
        return [process(v) for v in values]
    out = []
    missing = object()  # None is a value
    for v in values:
        found = memo.get(v, missing)
        if found is missing:
            found = memo[v] = process(v)
        out.append(found)
    return out


class BulkInsert:
    """An ``INSERT`` compiled once per column set, its rows converted by the column types.

    Core's ``executemany`` rebuilds a parameter dictionary and walks every bind for every row,
    a tenth of the persister's time at ten thousand events a second. The statement text and each
    column's bind processor are the ones Core itself uses (a UTC time on SQLite: one function
    checked to write the same text), so the driver gets the same values. Rows are converted
    column by column, and equal times once per transaction (``memo``).
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
            converted: list[tuple[int, Processor, bool]] = []
            for i, name in enumerate(names):
                if name in self.serialized:
                    continue
                process, memoised = _processor(self.table.c[name], self.dialect)
                if process is not None:
                    converted.append((i, process, memoised))
            plan = self._plans[keys] = _Plan(str(compiled), compiled.positional, names, converted)
        return plan

    def execute(self, conn: Connection, rows: Sequence[Row], memo: Memo | None = None) -> None:
        """Insert ``rows`` (dicts with the same keys) in one ``executemany``; ``memo``: converted
        times shared with the transaction's other inserts (one made here if not given)."""
        if not rows:
            return
        plan = self._plan(tuple(rows[0]))
        memo = {} if memo is None else memo
        columns = [[r[n] for r in rows] for n in plan.names]
        for i, process, memoised in plan.converted:
            columns[i] = _convert(columns[i], process, memo if memoised else None)
        params: list[Any] = list(zip(*columns, strict=True))
        if not plan.positional:
            names = plan.names
            params = [dict(zip(names, p, strict=True)) for p in params]
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
