"""What the customer's page learns from the store when its link is opened (read-only).

The retained ``OrderState`` carries status, window, timeline and destination but not the items
or the pickup point; a customer who has just proved their link (see :mod:`.enrolment`) gets
those from here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract.lifecycle import CLOSED, OrderStatus
from bloomwire.store import make_engine
from bloomwire.store import models as m


@dataclass(frozen=True, slots=True)
class OrderSummary:
    """The parts of an order its customer may see that the MQTT snapshot lacks."""

    shop: str
    order: str
    customer: str
    status: str
    items: tuple[str, ...]
    pickup: tuple[float, float] | None
    closed_at: datetime | None
    #: The delivery photo's reference (a ``PhotoRef`` as stored), if any (issue 16).
    photo: dict[str, object] | None = None

    def expired(self, grace_s: float, now: datetime | None = None) -> bool:
        """True once a closed order's customer access is past its grace period."""
        if self.status not in {s.value for s in CLOSED} or self.closed_at is None:
            return False
        return (now or datetime.now(UTC)) >= self.closed_at + timedelta(seconds=grace_s)

    def to_json(self) -> dict[str, object]:
        """What the page receives."""
        pickup = {"lat": self.pickup[0], "lon": self.pickup[1]} if self.pickup else None
        return {"items": list(self.items), "pickup": pickup}


class OrderLookup:
    """Reads one order by shop and id; one read-only engine for the web service's life."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._engine: Engine | None = None

    def _connect(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self._url, readonly=True)
        return self._engine

    def find(self, shop: str, order: str) -> OrderSummary | None:
        """The order ``order`` of shop ``shop``, or None (blocking: call it in a thread)."""
        o = m.ORDERS
        query = sa.select(
            o.c.status,
            o.c.customer_username,
            o.c["items"],
            o.c.pickup_lat,
            o.c.pickup_lon,
            o.c.closed_at,
            o.c.photo,
        ).where(o.c.id == order, o.c.shop == shop)
        try:
            with self._connect().connect() as conn:
                row = conn.execute(query).first()
        except sa.exc.OperationalError as exc:
            if "no such table" in str(exc):  # a store the persister has not created yet
                return None
            raise
        if row is None:
            return None
        status, customer, items, plat, plon, closed_at, photo = row
        pickup = (float(plat), float(plon)) if plat is not None and plon is not None else None
        return OrderSummary(
            shop=shop,
            order=order,
            customer=str(customer or ""),
            status=str(OrderStatus(status).value),
            items=tuple(str(i) for i in items or ()),
            pickup=pickup,
            closed_at=closed_at,
            photo=photo if isinstance(photo, dict) else None,
        )

    def close(self) -> None:
        """Release the engine's connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
