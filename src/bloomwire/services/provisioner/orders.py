"""What the provisioner reads from the store (read-only): orders' shops, statuses and customers.

Blocking (SQLAlchemy Core); the service calls it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from bloomwire.contract.lifecycle import CLOSED
from bloomwire.store import make_engine
from bloomwire.store.models import ORDERS

#: Order ids per ``IN (...)`` query.
CHUNK = 500
_CLOSED = tuple(s.value for s in CLOSED)
_COLUMNS = (ORDERS.c.id, ORDERS.c.shop, ORDERS.c.status, ORDERS.c.customer_username, ORDERS.c.closed_at)


@dataclass(frozen=True, slots=True)
class OrderRow:
    """One order as the provisioner needs it."""

    id: str
    shop: str
    status: str
    customer: str | None
    closed_at: datetime | None

    @property
    def closed(self) -> bool:
        """True once delivered, failed, cancelled or returned."""
        return self.status in _CLOSED


@dataclass(frozen=True, slots=True)
class Orders:
    """One look at the store: every open order, and the rows of the orders asked about."""

    open: list[OrderRow]
    known: dict[str, OrderRow]


def _row(r: Any) -> OrderRow:  # a Row of _COLUMNS
    closed_at = r.closed_at
    if closed_at is not None and closed_at.tzinfo is None:  # SQLite keeps naive UTC
        closed_at = closed_at.replace(tzinfo=UTC)
    return OrderRow(r.id, r.shop, r.status, r.customer_username, closed_at)


class OrderReader:
    """Read-only queries on the store's orders."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url, readonly=True)

    def customers_of(self, orders: Iterable[str]) -> dict[str, str]:
        """The customer ids the store names for ``orders`` (orders unknown or without one left out)."""
        wanted = list(orders)
        found: dict[str, str] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), CHUNK):
                query = sa.select(ORDERS.c.id, ORDERS.c.customer_username).where(
                    ORDERS.c.id.in_(wanted[i : i + CHUNK])
                )
                rows = conn.execute(query)
                found.update({str(r.id): str(r.customer_username) for r in rows if r.customer_username})
        return found

    def read(self, ids: Iterable[str]) -> Orders:
        """Every open order, and the rows of ``ids`` (missing ones are unknown to the store)."""
        wanted = list(ids)
        known: dict[str, OrderRow] = {}
        with self.engine.connect() as conn:
            opened = [
                _row(r) for r in conn.execute(sa.select(*_COLUMNS).where(ORDERS.c.status.not_in(_CLOSED)))
            ]
            for i in range(0, len(wanted), CHUNK):
                for r in conn.execute(sa.select(*_COLUMNS).where(ORDERS.c.id.in_(wanted[i : i + CHUNK]))):
                    known[r.id] = _row(r)
        return Orders(opened, known)

    def close(self) -> None:
        """Release the store's connections."""
        self.engine.dispose()
