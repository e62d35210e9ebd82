"""The persister's in-memory projections: the live rows and the indexes over them, and the
lookups every handler shares (which may refuse: unknown order, not this sender's)."""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from bloomwire.contract import geo
from bloomwire.contract.lifecycle import CLOSED, RIDER_BOUND, OrderStatus
from bloomwire.contract.topics import InboundTopic
from bloomwire.services.persister.rows import Alert, Offer, Order, Rider
from bloomwire.services.persister.tables import CachedTable
from bloomwire.services.persister.work import RefusedError, UnitOfWork
from bloomwire.store import models as m

S = OrderStatus
#: The statuses in which an order's rider may report on it (after failed: returned).
RIDER_HOLDS = RIDER_BOUND | {S.FAILED}


class Projections:
    """Open orders, riders, pending offers and open alerts, with what is derived from them."""

    def __init__(
        self, engine: sa.Engine, *, manual_offer_timeout_s: int = 90, shop_language: str = "en"
    ) -> None:
        self.engine = engine
        self.manual_offer_timeout_s = manual_offer_timeout_s
        #: An order's language when its shop named none for the customer.
        self.shop_language = shop_language
        self.orders = CachedTable(m.ORDERS, Order, engine)
        self.riders = CachedTable(m.RIDERS, Rider, engine)
        self.offers = CachedTable(m.OFFERS, Offer, engine)
        self.alerts = CachedTable(m.ALERTS, Alert, engine)
        #: rider -> the orders it carries (status in RIDER_BOUND)
        self.rider_orders: dict[str, set[str]] = defaultdict(set)
        #: customer username -> its order (open ones; closed ones are read back from the store)
        self.customer_orders: dict[str, str] = {}
        #: order id -> ids of its open alerts: a snapshot counts them without a scan of every alert.
        self.open_alerts: dict[str, set[str]] = {}
        self.fixes: dict[str, deque[geo.Fix]] = defaultdict(lambda: deque(maxlen=6))
        self.last_trail: dict[str, tuple[float, float, datetime]] = {}
        self.state_sent_at: dict[str, datetime] = {}
        self.rider_state_sent_at: dict[str, datetime] = {}

    @property
    def tables(self) -> tuple[CachedTable[Order], CachedTable[Rider], CachedTable[Offer], CachedTable[Alert]]:
        """The cached tables, in the order they are written."""
        return (self.orders, self.riders, self.offers, self.alerts)

    def load(self) -> None:
        """Read the live part of the store (open orders, riders, pending offers, open alerts)."""
        closed = [s.value for s in CLOSED]
        orders, riders, offers, alerts = m.ORDERS, m.RIDERS, m.OFFERS, m.ALERTS
        with self.engine.connect() as conn:
            self.orders.load(*_read(conn, sa.select(orders).where(orders.c.status.not_in(closed))))
            self.riders.load(*_read(conn, sa.select(riders)))
            self.offers.load(*_read(conn, sa.select(offers).where(offers.c.status == "pending")))
            self.alerts.load(*_read(conn, sa.select(alerts).where(alerts.c.status != "resolved")))
        for order in self.orders.values():
            if order.rider and order.status in RIDER_BOUND:
                self.rider_orders[order.rider].add(order.id)
            if order.customer_username:
                self.customer_orders[order.customer_username] = order.id
        for alert in self.alerts.values():
            self.index_alert(alert)

    def clear(self) -> None:
        """Forget everything (before a reload).

        Rolling back only the rows a batch touched is not enough: the indexes over them (which
        orders a rider carries, which order a customer has) and the trail spacing would go on
        without them, and positions would stop reaching the order.
        """
        for table in self.tables:
            table.clear()
        self.rider_orders.clear()
        self.customer_orders.clear()
        self.open_alerts.clear()
        self.last_trail.clear()

    def index_alert(self, alert: Alert) -> None:
        """Keep :attr:`open_alerts` in step with ``alert``'s status."""
        order_id = alert.order_id
        if not order_id:
            return
        if alert.status == "open":
            self.open_alerts.setdefault(order_id, set()).add(alert.id)
            return
        ids = self.open_alerts.get(order_id)
        if ids is not None:
            ids.discard(alert.id)
            if not ids:
                del self.open_alerts[order_id]

    # --- lookups ----------------------------------------------------------------------------------

    def order(self, order_id: str) -> Order:
        """The order, or a refusal."""
        order = self.orders.get(order_id)
        if order is None:
            raise RefusedError(f"unknown order {order_id!r}")
        return order

    def shop_order(self, where: InboundTopic, order_id: str) -> Order:
        """The order, if it is the sending shop's."""
        order = self.order(order_id)
        if order.shop != where.sender:
            raise RefusedError(f"order {order_id!r} does not belong to shop {where.sender!r}")
        return order

    def rider_order(self, where: InboundTopic, order_id: str) -> Order:
        """The order, if the sending rider holds it (authority)."""
        order = self.order(order_id)
        if order.rider != where.sender:
            raise RefusedError(f"order {order_id!r} is not assigned to rider {where.sender!r}")
        status = order.status
        if status not in RIDER_HOLDS:  # its rider, but no longer in its hands
            why = "it is closed" if status in CLOSED else f"rider {where.sender!r} no longer holds it"
            raise RefusedError(f"order {order_id!r} is {status}; {why}")
        return order

    def customer_order(self, username: str) -> str | None:
        """The order a customer username belongs to: open orders from memory, closed ones (whose
        customer may still answer a follow-up, and whose username stays taken) from the store."""
        order_id = self.customer_orders.get(username)
        if order_id is None:
            orders = m.ORDERS
            with self.engine.connect() as conn:
                order_id = conn.execute(
                    sa.select(orders.c.id).where(orders.c.customer_username == username).limit(1)
                ).scalar()
            if order_id is not None:
                self.customer_orders[username] = order_id
        return order_id

    def rider(self, work: UnitOfWork, rider_id: str) -> Rider:
        """The rider, added (offline, idle since now) on first mention."""
        rider = self.riders.get(rider_id)
        if rider is None:
            rider = work.add(self.riders, Rider(id=rider_id, idle_since=work.now, updated_at=work.now))
        return rider


# --- start-up reads -------------------------------------------------------------------------------

_fromiso = datetime.fromisoformat


def _utc(value: str | None) -> datetime | None:
    """SQLite's naive UTC text as an aware datetime (what :class:`~bloomwire.store.models.UTCDateTime`
    gives), in one C call."""
    return None if value is None else _fromiso(value + "+00:00")


def _json(value: str | None) -> Any:
    if value is None:
        return None
    return [] if value == "[]" else json.loads(value)


def _convert(column: sa.ColumnElement[Any]) -> Callable[[Any], Any] | None:
    kind = column.type
    if isinstance(kind, m.UTCDateTime):
        return _utc
    if isinstance(kind, sa.JSON):
        return _json
    if isinstance(kind, sa.Boolean):
        return bool
    return None


def _read(conn: sa.Connection, query: sa.Select[Any]) -> tuple[Sequence[str], Iterable[Sequence[Any]]]:
    """Column names and rows of ``query``. On SQLite through the driver, turning only the values
    that need it: SQLAlchemy's result processing was most of a 100,000-order start-up (#19)."""
    if conn.dialect.name != "sqlite":
        result = conn.execute(query)
        return tuple(result.keys()), result
    columns = list(query.selected_columns)
    turns = [(i, f) for i, c in enumerate(columns) if (f := _convert(c)) is not None]
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    cursor = conn.connection.cursor()
    try:
        cursor.execute(str(compiled))
        raws = cursor.fetchall()
    finally:
        cursor.close()
    rows = []
    for raw in raws:
        row = list(raw)
        for i, turn in turns:
            row[i] = turn(row[i])
        rows.append(row)
    return [c.name for c in columns], rows
