"""Dispatch's reads of the store (read-only): waiting orders, online riders, overdue offers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import UNASSIGNED, OrderStatus
from bloomwire.services.dispatch.planner import OrderRequest, RiderCandidate
from bloomwire.store import models as m

ORDERS, RIDERS, OFFERS = m.ORDERS, m.RIDERS, m.OFFERS
_WAITING = sorted(s.value for s in UNASSIGNED)


@dataclass(frozen=True, slots=True)
class WaitingOrder:
    """An order in ``created`` or ``declined``, as the store has it."""

    id: str
    shop: str
    status: str
    lat: float
    lon: float
    pickup_lat: float | None
    pickup_lon: float | None
    declined_by: tuple[str, ...]
    created_at: datetime
    #: Offers of this order so far (any mode, any outcome): the next offer's number.
    attempt: int
    address: str = ""

    def pickup(self) -> ev.Place | None:
        """Where the rider collects the order, if the shop said."""
        if self.pickup_lat is None or self.pickup_lon is None:
            return None
        return ev.Place(lat=self.pickup_lat, lon=self.pickup_lon)

    def request(self) -> OrderRequest:
        """The planner's view. The rider first rides to the pickup point: the order's own
        ``pickup_lat/lon`` when the shop gave one. There is no shops table yet, so without one
        the delivery address stands in for the shop's location -- an approximation that is fine
        for shops delivering nearby and wrong for far deliveries; shops should send pickup_*."""
        if self.pickup_lat is not None and self.pickup_lon is not None:
            lat, lon = self.pickup_lat, self.pickup_lon
        else:
            lat, lon = self.lat, self.lon
        return OrderRequest(self.id, self.shop, lat, lon, self.created_at)


@dataclass(frozen=True, slots=True)
class OverdueOffer:
    """A pending offer whose deadline has passed."""

    offer: str
    order: str
    rider: str
    deadline: datetime


@dataclass(frozen=True)
class Snapshot:
    """What one pass read from the store."""

    orders: list[WaitingOrder]
    riders: list[RiderCandidate]
    offline: int
    overdue: list[OverdueOffer]
    #: False when overdue offers were not looked for (a pass woken by an event, not the clock).
    full: bool = True


class StoreReader:
    """Reads what a pass decides over. Thread-confined, like the pass that calls it."""

    def __init__(self, engine: Engine, *, max_waiting: int) -> None:
        self.engine = engine
        #: At most this many waiting orders (oldest first) are read.
        self.max_waiting = max_waiting
        self._offline = 0

    def read(self, now: datetime, *, full: bool = True) -> Snapshot:
        """Waiting orders (with their offer counts) and online riders; with ``full`` also the
        overdue offers and the number of offline riders (else the last count), which only the
        clock changes -- so a pass woken by an event costs two queries, a tick's four."""
        n_offers = (
            sa.select(sa.func.count())
            .select_from(OFFERS)
            .where(OFFERS.c.order_id == ORDERS.c.id)
            .scalar_subquery()
        )
        orders_q = (
            sa.select(
                ORDERS.c.id,
                ORDERS.c.shop,
                ORDERS.c.status,
                ORDERS.c.lat,
                ORDERS.c.lon,
                ORDERS.c.pickup_lat,
                ORDERS.c.pickup_lon,
                ORDERS.c.address,
                ORDERS.c.declined_by,
                ORDERS.c.created_at,
                n_offers.label("n_offers"),
            )
            .where(ORDERS.c.status.in_(_WAITING))
            .order_by(ORDERS.c.created_at, ORDERS.c.id)
            .limit(self.max_waiting)
        )
        overdue_q = sa.select(ORDERS.c.id, ORDERS.c.offer_id, ORDERS.c.rider, ORDERS.c.offer_deadline).where(
            ORDERS.c.status == OrderStatus.ASSIGNED.value,
            ORDERS.c.offer_id.is_not(None),
            ORDERS.c.offer_deadline <= now,
        )
        riders_q = sa.select(RIDERS).where(RIDERS.c.presence == topics.PRESENCE_ONLINE)
        offline_q = (
            sa.select(sa.func.count()).select_from(RIDERS).where(RIDERS.c.presence != topics.PRESENCE_ONLINE)
        )
        with self.engine.connect() as conn:
            # Orders before riders: a rider's load read later can only include more of our offers.
            order_rows = conn.execute(orders_q).all()
            overdue_rows = conn.execute(overdue_q).all() if full else []
            rider_rows = conn.execute(riders_q).all()
            if full:
                self._offline = int(conn.execute(offline_q).scalar_one())
        offline = self._offline
        orders = [
            WaitingOrder(
                id=r.id,
                shop=r.shop,
                status=r.status,
                lat=r.lat,
                lon=r.lon,
                pickup_lat=r.pickup_lat,
                pickup_lon=r.pickup_lon,
                declined_by=tuple(r.declined_by or ()),
                created_at=r.created_at,
                attempt=int(r.n_offers),
                address=r.address or "",
            )
            for r in order_rows
        ]
        declined: dict[str, set[str]] = {}
        for o in orders:
            for rider in o.declined_by:
                declined.setdefault(rider, set()).add(o.id)
        riders = [
            RiderCandidate(
                id=r.id,
                lat=r.lat,
                lon=r.lon,
                load=int(r.load),
                capacity=int(r.capacity),
                online=r.presence == topics.PRESENCE_ONLINE,
                on_duty=bool(r.on_duty),
                position_at=r.position_at,
                speed_kmh=r.speed_kmh,
                last_decline_at=r.last_decline_at,
                idle_since=r.idle_since,
                declined_orders=frozenset(declined.get(r.id, ())),
            )
            for r in rider_rows
        ]
        overdue = [
            OverdueOffer(offer=r.offer_id, order=r.id, rider=r.rider, deadline=r.offer_deadline)
            for r in overdue_rows
            if r.rider is not None
        ]
        return Snapshot(orders=orders, riders=riders, offline=offline, overdue=overdue, full=full)
