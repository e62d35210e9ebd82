"""Moving an order through its lifecycle, shared by the order and offer handlers: the checked
transition with its rider loads and timestamps, the canonical status, the order's open offer."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED, RIDER_BOUND, UNASSIGNED, OrderStatus, check_transition
from bloomwire.errors import BloomwireError
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.work import RefusedError, UnitOfWork

S = OrderStatus

STEP_COLUMN: dict[OrderStatus, str] = {
    S.ASSIGNED: "assigned_at",
    S.ACCEPTED: "accepted_at",
    S.PICKED_UP: "picked_up_at",
    S.EN_ROUTE: "en_route_at",
    S.ARRIVED: "arrived_at",
    S.DELIVERED: "delivered_at",
}


class Keep(Enum):
    """The order keeps its rider."""

    KEEP = 0


def set_status(
    p: Projections,
    work: UnitOfWork,
    order: Order,
    status: OrderStatus,
    at: datetime,
    *,
    rider: str | Keep | None = Keep.KEEP,
) -> None:
    """Move ``order`` to ``status`` (validated), keeping rider loads and timestamps in step."""
    check = S(order.status)
    if status is not check or status is S.ASSIGNED:
        try:
            check_transition(check, status)
        except BloomwireError as exc:
            raise RefusedError(f"order {order.id}: {exc}") from None
    old_rider = order.rider
    new_rider = old_rider if isinstance(rider, Keep) else rider
    values: dict[str, Any] = {"status": status.value, "rider": new_rider, "updated_at": work.now}
    column = STEP_COLUMN.get(status)
    if column:
        values[column] = at
    if status in CLOSED:
        values["closed_at"] = at
    if status in UNASSIGNED:
        values["offer_id"] = None
        values["offer_deadline"] = None
    work.change(p.orders, order, **values)
    work.states[order.id] = None
    bound = status in RIDER_BOUND
    for rid in {old_rider, new_rider} - {None}:
        assert rid is not None
        _keep_load(p, work, order, rid, holds=bound and rid == new_rider)


def _keep_load(p: Projections, work: UnitOfWork, order: Order, rider_id: str, *, holds: bool) -> None:
    orders = p.rider_orders[rider_id]
    if holds:
        orders.add(order.id)
    else:
        orders.discard(order.id)
    rider = p.rider(work, rider_id)
    if rider.load != len(orders):
        now = work.now
        if orders:
            work.change(p.riders, rider, load=len(orders), updated_at=now)
        else:
            work.change(p.riders, rider, load=0, updated_at=now, idle_since=now)
        # The order's shop hears of it even when the rider no longer carries for it.
        work.rider_states[rider_id].add(order.shop)


def publish_status(work: UnitOfWork, order: Order, event: Any, note: str = "") -> None:
    """The canonical ``order.status_changed`` of ``order`` (same id, source and time as ``event``)."""
    data = ev.OrderStatusChanged(
        order=order.id,
        status=S(order.status),
        reason=order.failure_reason if order.status == S.FAILED else None,
        note=note,
        rider=order.rider,
    )
    canonical = ev.OrderStatusChangedEvent(id=event.id, source=event.source, time=event.time, data=data)
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), ev.encode(canonical))


def close_offer(
    p: Projections, work: UnitOfWork, order: Order, status: str, *, offer_id: str | None = None
) -> None:
    """Close the order's pending offer (or ``offer_id``, if given), if any, as ``status``."""
    offer_id = offer_id or order.offer_id
    offer = p.offers.get(offer_id) if offer_id else None
    if offer is not None and offer.status == "pending":
        work.change(p.offers, offer, status=status, closed_at=work.now)
