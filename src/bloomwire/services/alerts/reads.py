"""The alerts service's reads of the store (read-only): live orders, riders and open alerts as
views, through the driver's raw rows where SQLAlchemy's result processing would cost most."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from bloomwire.contract import events as ev
from bloomwire.contract.lifecycle import CLOSED, OrderStatus
from bloomwire.services.alerts.book import Tracked
from bloomwire.services.alerts.rules import (
    FAILED_OUTCOME,
    AlertKey,
    OrderView,
    RiderView,
    alert_key,
)
from bloomwire.store import make_engine
from bloomwire.store.models import ALERTS, ORDERS, RIDERS

ACTIVE: Final = tuple(s.value for s in OrderStatus if s not in CLOSED)
FAILED: Final = tuple(s.value for s in FAILED_OUTCOME)
_CHUNK: Final = 500
#: How far before the newest ``updated_at`` seen a read of changed rows starts again: a clock
#: stepped back by this much still loses no change (rows read twice are compared, not rebuilt).
CHANGE_MARGIN: Final = timedelta(seconds=5)
V = TypeVar("V")


_O = ORDERS.c
ORDER_COLUMNS = (
    _O.id,
    _O.shop,
    _O.status,
    _O.rider,
    _O.customer_name,
    _O.window_start,
    _O.window_end,
    _O.eta,
    _O.created_at,
    _O.accepted_at,
    _O.delivered_at,
    _O.closed_at,
    _O.failure_reason,
    _O.handover_failures,
    _O.updated_at,  # last: ORDER_UPDATED_AT
)
#: Where ``updated_at`` is among them.
ORDER_UPDATED_AT = len(ORDER_COLUMNS) - 1
#: The same columns without SQLAlchemy's result processing (raw driver values, see _dt).
RAW_ORDER_COLUMNS = tuple(sa.type_coerce(c, sa.String()).label(c.name) for c in ORDER_COLUMNS)
_R = RIDERS.c
RIDER_COLUMNS = (_R.id, _R.presence, _R.presence_at, _R.position_at, _R.lat, _R.lon, _R.load)
#: What the tick reads of each rider: its view's columns, then when its row last changed.
RIDER_LIVE_COLUMNS = (*RIDER_COLUMNS, _R.updated_at)
_A = ALERTS.c
ALERT_COLUMNS = (
    _A.id,
    _A.rule,
    _A.shop,
    _A.order_id,
    _A.rider,
    _A.status,
    _A.level,
    _A.raised_at,
    _A.escalated_at,
)


def chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


_STATUS_OF: Final = {s.value: s for s in OrderStatus}
_PRESENCE_OF: Final = {p.value: p for p in ev.Presence}
_fromiso = datetime.fromisoformat


def _dt(value: Any) -> datetime | None:
    """A raw driver value as an aware UTC datetime (SQLite keeps naive UTC text)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _fromiso(value + "+00:00")
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _dt_required(value: Any) -> datetime:
    parsed = _dt(value)
    assert parsed is not None, "NOT NULL column is NULL"
    return parsed


def order_from_raw(r: Sequence[Any]) -> OrderView:
    return OrderView(
        id=r[0],
        shop=r[1],
        status=_STATUS_OF.get(r[2]) or OrderStatus(r[2]),
        rider=r[3],
        customer_name=r[4] or "",
        window_start=_dt_required(r[5]),
        window_end=_dt_required(r[6]),
        eta=_dt(r[7]),
        created_at=_dt_required(r[8]),
        accepted_at=_dt(r[9]),
        delivered_at=_dt(r[10]),
        closed_at=_dt(r[11]),
        failure_reason=r[12],
        handover_failures=int(r[13] or 0),
        updated_at=_dt_required(r[14]),
    )


def rider_from_raw(r: Sequence[Any]) -> RiderView:
    return RiderView(
        id=r[0],
        presence=_PRESENCE_OF.get(r[1]) or ev.Presence(r[1]),
        presence_at=_dt(r[2]),
        position_at=_dt(r[3]),
        lat=r[4],
        lon=r[5],
        load=r[6],
    )


def alert_from_raw(r: Sequence[Any]) -> Tracked:
    key = alert_key(r[1], r[2], r[3], r[4])
    return Tracked(r[0], key, r[5], r[6], _dt(r[8]) or _dt_required(r[7]))


class RowCache(Generic[V]):
    """One full read of a table through the driver, keeping the views of unchanged rows.

    SQLAlchemy's typed result processing costs several times the query itself on ten thousand
    rows, and most rows do not change between two ticks: rows are compared raw and only changed
    ones are turned into views again. The first column must be the primary key.
    """

    def __init__(self, query: sa.Select[Any], build: Callable[[Sequence[Any]], V]) -> None:
        self.query = query
        self.build = build
        self.rows: dict[str, tuple[Sequence[Any], V]] = {}
        self._sql: dict[str, str] = {}

    def read(self, conn: Connection) -> dict[str, V]:
        """Every row of the query, as views by primary key."""
        dialect = conn.dialect
        sql = self._sql.get(dialect.name)
        if sql is None:
            compiled = self.query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            sql = self._sql[dialect.name] = str(compiled)
        cursor = conn.connection.cursor()  # plain tuples: compared in C, no per-row processing
        try:
            cursor.execute(sql)
            raws = cursor.fetchall()
        finally:
            cursor.close()
        old, fresh = self.rows, {}
        build = self.build
        for raw in raws:
            hit = old.get(raw[0])
            fresh[raw[0]] = hit if hit is not None and hit[0] == raw else (raw, build(raw))
        self.rows = fresh
        return {k: v for k, (_, v) in fresh.items()}


class ChangedRows(Generic[V]):
    """The live rows of a table read once in full, then only those changed since (#19).

    A later read asks for the rows of ``live`` whose ``updated_at`` is at or after the newest one
    seen (less :data:`CHANGE_MARGIN`): the persister, the only writer, commits its batches in the
    order of their ``updated_at``, so a batch committed after this read is found by the next
    one. Rows that left ``live`` are named by ``gone`` (a query of ids, bound to ``since``) and
    dropped. Unchanged rows keep their view object, as with :class:`RowCache`. The first
    column must be the primary key; ``updated_at`` the column at ``updated_at_index``.
    """

    def __init__(
        self,
        columns: Sequence[sa.ColumnElement[Any]],
        live: sa.ColumnElement[bool],
        build: Callable[[Sequence[Any]], V],
        *,
        updated_at_index: int,
        gone: sa.Select[Any] | None = None,
    ) -> None:
        self.full = RowCache(sa.select(*columns).where(live), build)
        updated_at = columns[updated_at_index]
        raw = [sa.type_coerce(c, sa.String()).label(c.name) for c in columns]  # as the driver has them
        self.changed = sa.select(*raw).where(live, updated_at >= sa.bindparam("since", type_=updated_at.type))
        self.gone = gone
        self.build = build
        self.index = updated_at_index
        self.views: dict[str, V] = {}
        self.newest: datetime | None = None
        #: Rows read by the last :meth:`read` (all of them the first time).
        self.last_read = 0

    def read(self, conn: Connection) -> dict[str, V]:
        """Every live row as a view by primary key (a new dict; the views are shared)."""
        if self.newest is None:
            self.views = self.full.read(conn)
            rows = [raw for raw, _ in self.full.rows.values()]
            self.last_read = len(rows)
        else:
            since = self.newest - CHANGE_MARGIN
            rows = [tuple(r) for r in conn.execute(self.changed, {"since": since})]
            self.last_read = len(rows)
            cache, views = self.full.rows, self.views
            if self.gone is not None:
                for (gone,) in conn.execute(self.gone, {"since": since}):
                    cache.pop(gone, None)
                    views.pop(gone, None)
            for raw in rows:
                hit = cache.get(raw[0])
                if hit is None or hit[0] != raw:
                    hit = cache[raw[0]] = (raw, self.build(raw))
                    views[raw[0]] = hit[1]
        # Raw values compare as the times they are (SQLite's fixed-width text, or datetimes).
        i = self.index
        newest = _dt(max((raw[i] for raw in rows if raw[i] is not None), default=None))
        if self.newest is None or (newest is not None and newest > self.newest):
            self.newest = newest or datetime.min.replace(tzinfo=UTC) + CHANGE_MARGIN
        return dict(self.views)


class ViewCache(Generic[V]):
    """Views of the rows of a query that changes (a time bound, a list of ids): unchanged rows
    keep their view object, which tells the :class:`~bloomwire.services.alerts.watch.Watch` they
    did not change."""

    def __init__(self, build: Callable[[Sequence[Any]], V]) -> None:
        self.build = build
        self.rows: dict[str, tuple[tuple[Any, ...], V]] = {}
        self._fresh: dict[str, tuple[tuple[Any, ...], V]] = {}

    def start(self) -> None:
        self.rows, self._fresh = self._fresh, {}

    def view(self, row: Sequence[Any]) -> V:
        raw = tuple(row)
        hit = self._fresh.get(raw[0]) or self.rows.get(raw[0])
        if hit is None or hit[0] != raw:
            hit = (raw, self.build(raw))
        self._fresh[raw[0]] = hit
        return hit[1]


def read_order_rows(conn: Connection, order_ids: list[str], rider_ids: list[str]) -> dict[str, Any]:
    """Rows of the given orders and of every live order the given riders carry, by id."""
    rows: dict[str, Any] = {}
    for part in chunks(order_ids):
        for r in conn.execute(sa.select(*ORDER_COLUMNS).where(_O.id.in_(part))):
            rows[r.id] = r
    for part in chunks(rider_ids):
        query = sa.select(*ORDER_COLUMNS).where(_O.rider.in_(part), _O.status.in_(ACTIVE))
        for r in conn.execute(query):
            rows[r.id] = r
    return rows


def read_riders(conn: Connection, ids: list[str]) -> dict[str, RiderView]:
    riders: dict[str, RiderView] = {}
    for part in chunks(ids):
        for r in conn.execute(sa.select(*RIDER_COLUMNS).where(_R.id.in_(part))):
            riders[r.id] = RiderView.from_row(r)
    return riders


def count_alerts(conn: Connection, keys: Iterable[AlertKey]) -> dict[AlertKey, int]:
    """How many alerts (any status) the store holds for each of ``keys``."""
    wanted = set(keys)
    if not wanted:
        return {}
    orders = sorted({k[2] for k in wanted if k[2] is not None})
    riders = sorted({k[3] for k in wanted if k[2] is None and k[3] is not None})
    cols = (_A.rule, _A.shop, _A.order_id, _A.rider, sa.func.count())
    found: dict[AlertKey, int] = dict.fromkeys(wanted, 0)
    queries = [
        sa.select(*cols).where(_A.order_id.in_(part)).group_by(*cols[:4]) for part in chunks(orders)
    ] + [
        sa.select(*cols).where(_A.order_id.is_(None), _A.rider.in_(part)).group_by(*cols[:4])
        for part in chunks(riders)
    ]
    for query in queries:
        for rule, shop, order, rider, n in conn.execute(query):
            key = alert_key(rule, shop, order, rider)
            if key in found:
                found[key] = n
    return found


def readonly_engine(url: str) -> Engine:
    """The store, read-only (PostgreSQL: one consistent snapshot per read)."""
    engine = make_engine(url, readonly=True)
    if engine.dialect.name == "postgresql":
        # One consistent snapshot per read, and the server refuses any write.
        return engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine
