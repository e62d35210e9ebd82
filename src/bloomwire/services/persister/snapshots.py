"""The retained snapshots: an order's state, a rider's state per shop, and when a closed
order's state leaves the broker (its grace: the same as its customer's access)."""

from __future__ import annotations

import heapq
import math
from datetime import datetime, timedelta

import sqlalchemy as sa

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED, OUT_FOR_DELIVERY, OrderStatus
from bloomwire.services.persister import amendments
from bloomwire.services.persister.lifecycle import STEP_COLUMN
from bloomwire.services.persister.messages import Outbound
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order, Rider
from bloomwire.store import models as m

S = OrderStatus


def _position(rider: Rider | None) -> ev.Position | None:
    # A rider row may hold a position without its time (older stores, `bench alerts` seeds):
    # no time, no position in the snapshot.
    if rider is None or rider.lat is None or rider.lon is None or rider.position_at is None:
        return None
    return ev.Position(lat=rider.lat, lon=rider.lon, at=rider.position_at, speed_kmh=rider.speed_kmh)


def order_state(order: Order, rider: Rider | None, open_alerts: int) -> ev.OrderState:
    """The retained snapshot of an order (``rider``: its rider's row, if any)."""
    timeline = [ev.TimelineEntry(status=S.CREATED, at=order.created_at)]
    for status, column in STEP_COLUMN.items():
        at = getattr(order, column)
        if at is not None:
            timeline.append(ev.TimelineEntry(status=status, at=at))
    closing = order.status in CLOSED and order.status not in STEP_COLUMN
    if closing and order.closed_at is not None:
        # delivered already has its step above; cancelled, failed and returned end it here
        note = order.failure_reason or ""
        timeline.append(ev.TimelineEntry(status=S(order.status), at=order.closed_at, note=note))
    amended = amendments.timeline_entry(order)
    if amended is not None:
        timeline.append(amended)
    timeline.sort(key=lambda t: t.at)
    out = order.status in OUT_FOR_DELIVERY
    return ev.OrderState(
        order=order.id,
        shop=order.shop,
        status=S(order.status),
        rider=order.rider,
        customer=order.customer_name,
        window=ev.Window(start=order.window_start, end=order.window_end),
        eta=order.eta if out else None,
        position=_position(rider) if out else None,
        timeline=timeline[-20:],
        open_alerts=open_alerts,
        updated_at=order.updated_at,
        destination=ev.Place(lat=order.lat, lon=order.lon, address=order.address or ""),
        rating=order.rating,
        rating_comment=order.rating_comment,
        **amendments.state_fields(order),
        handover_code=order.handover_code,
        handover_code_required=order.handover_code_required,
        photo=ev.PhotoRef.model_validate(order.photo) if order.photo else None,
        language=ev.Language(order.language),
        notice=ev.StateNotice.model_validate(order.notice) if order.notice else None,
    )


def rider_state_msgs(
    p: Projections, rider: Rider, now: datetime, also: set[str] | None = None
) -> list[Outbound]:
    """Retained rider state for each shop it carries for (and ``also``: shops it just left)."""
    rows = p.orders.rows
    shops = {rows[o].shop for o in p.rider_orders.get(rider.id, ()) if o in rows} | (also or set())
    if not shops:
        return []
    state = ev.RiderState(
        rider=rider.id,
        presence=ev.Presence(rider.presence),
        on_duty=rider.on_duty,
        load=rider.load,
        capacity=rider.capacity,
        position=_position(rider),
        updated_at=rider.updated_at or now,
    )
    payload = ev.encode(state)
    return [Outbound(topics.shop_rider_state(s, rider.id), payload, retain=True) for s in sorted(shops)]


class Clearings:
    """When closed orders' retained states are cleared: ``grace_s`` after their close.

    ``due`` is the truth (an order that closes again gets a later date; the older heap entry is
    skipped). ``grace_s`` None: kept.
    """

    def __init__(self, grace_s: float | None) -> None:
        self.grace_s = grace_s
        #: (due, order id) of closed orders' retained states to clear
        self.heap: list[tuple[datetime, str]] = []
        #: order id -> (due, shop)
        self.due: dict[str, tuple[datetime, str]] = {}

    def load(self, engine: sa.Engine, now: datetime) -> None:
        """Date the clearing of orders closed within the grace (older ones were published with
        a message expiry, so the broker drops them even if this process was down when due)."""
        if self.grace_s is None:
            return
        since = now - timedelta(seconds=self.grace_s)
        orders = m.ORDERS
        cols = (orders.c.id, orders.c.shop, orders.c.closed_at)
        query = sa.select(*cols).where(orders.c.closed_at >= since)  # set only when closed
        with engine.connect() as conn:
            for order_id, shop, closed_at in conn.execute(query):
                self.date(order_id, shop, closed_at)

    def clear(self) -> None:
        """Forget every date (before a reload)."""
        self.heap.clear()
        self.due.clear()

    def date(self, order_id: str, shop: str, closed_at: datetime) -> datetime:
        """When the state of ``order_id``, closed at ``closed_at``, is cleared."""
        assert self.grace_s is not None
        due = closed_at + timedelta(seconds=self.grace_s)
        self.due[order_id] = (due, shop)
        heapq.heappush(self.heap, (due, order_id))
        return due

    def take_due(self, now: datetime) -> list[Outbound]:
        """Empty retained publishes for the closed orders whose grace has ended (each once)."""
        out: list[Outbound] = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            due, order_id = heapq.heappop(heap)
            entry = self.due.get(order_id)
            if entry is None or entry[0] != due:
                continue  # re-dated since
            del self.due[order_id]
            topic = topics.order_topic(entry[1], order_id, topics.OrderChannel.STATE)
            out.append(Outbound(topic, b"", qos=1, retain=True))
        return out

    def expiry_s(self, order: Order, now: datetime) -> int | None:
        """How long a closed order's state may stay (0: its grace is over), dating its clearing;
        None for an open one, or with no grace."""
        if self.grace_s is None or order.status not in CLOSED or order.closed_at is None:
            return None
        due = self.date(order.id, order.shop, order.closed_at)
        return max(0, math.ceil((due - now).total_seconds()))


def order_state_msg(p: Projections, clearings: Clearings, order: Order, now: datetime) -> Outbound:
    """The retained state; a closed order's expires with its grace (or is cleared, past it)."""
    topic = topics.order_topic(order.shop, order.id, topics.OrderChannel.STATE)
    expiry = clearings.expiry_s(order, now)
    if expiry == 0:
        return Outbound(topic, b"", qos=1, retain=True)
    rider = p.riders.rows.get(order.rider) if order.rider else None
    state = order_state(order, rider, len(p.open_alerts.get(order.id, ())))
    return Outbound(topic, ev.encode(state), qos=1, retain=True, expiry_s=expiry)
