"""Orders: created and cancelled by their shop, reported on by their rider, assigned by hand."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OUT_FOR_DELIVERY, UNASSIGNED, OrderStatus
from bloomwire.contract.topics import InboundTopic
from bloomwire.errors import PayloadError
from bloomwire.services.persister import offers, proof, riders
from bloomwire.services.persister.lifecycle import close_offer, publish_status, set_status
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.work import RefusedError, UnitOfWork, derived_id

S = OrderStatus


def created(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderCreatedEvent) -> None:
    """A shop's new order; its customer's username must be free."""
    d = event.data
    if p.orders.get(d.order) is not None:
        raise RefusedError(f"order {d.order!r} already exists")
    customer = d.customer_username or topics.customer_for_order(d.order)
    if p.customer_order(customer) is not None:
        raise RefusedError(f"customer access {customer!r} is already used by another order")
    order = Order(
        id=d.order,
        shop=where.sender,
        status=S.CREATED.value,
        customer_name=d.customer.name,
        customer_phone=d.customer.phone,
        address=d.customer.address,
        lat=d.customer.lat,
        lon=d.customer.lon,
        pickup_lat=d.pickup_lat,
        pickup_lon=d.pickup_lon,
        items=list(d.items),
        note=d.note,
        customer_username=customer,
        window_start=d.window.start,
        window_end=d.window.end,
        handover_code=proof.mint_code(),
        handover_code_required=d.handover_code_required,
        language=d.language.value if d.language else p.shop_language,
        created_at=event.time,
        updated_at=work.now,
    )
    work.add(p.orders, order)
    p.customer_orders[customer] = d.order
    work.states[d.order] = None
    publish_status(work, order, event, d.note)


def cancelled(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderCancelledEvent) -> None:
    """The shop cancels its order (and its open offer)."""
    order = p.shop_order(where, event.data.order)
    set_status(p, work, order, S.CANCELLED, event.time)
    close_offer(p, work, order, "cancelled")
    publish_status(work, order, event, event.data.reason)


def rider_status(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderStatusChangedEvent
) -> None:
    """The order's rider reports a step (picked up, en route, …), or hands the order back."""
    d = event.data
    try:
        ev.check_rider_status(d)
    except PayloadError as exc:
        raise RefusedError(str(exc)) from None
    order = p.rider_order(where, d.order)
    if d.status is S.DECLINED:
        # The rider hands the order back: it goes to the next candidate. The declined status
        # clears the order's offer, so the pending one is named before and closed after.
        offered = order.offer_id
        set_status(p, work, order, S.DECLINED, event.time, rider=None)
        if where.sender not in order.declined_by:
            work.change(p.orders, order, declined_by=[*order.declined_by, where.sender])
        close_offer(p, work, order, "released", offer_id=offered)
        rider = p.rider(work, where.sender)
        work.change(p.riders, rider, last_decline_at=work.now)
    else:
        if d.status is S.DELIVERED:
            proof.check_handover(work, p, order, d.code)
        set_status(p, work, order, d.status, event.time)
        if d.status is S.FAILED:  # only once the transition is accepted: a refusal changes nothing
            work.change(p.orders, order, failure_reason=d.reason.value if d.reason else None)
        if d.status in OUT_FOR_DELIVERY:
            riders.update_eta(p, work, order)
    publish_status(work, order, event, d.note)


def incident(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderIncidentReportedEvent
) -> None:
    """A rider's incident (a flat tyre), with a new ETA when it gives one; published as it is."""
    order = p.rider_order(where, event.data.order)
    if event.data.eta is not None:
        work.change(p.orders, order, eta=event.data.eta, updated_at=work.now)
        work.states[order.id] = None
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), ev.encode(event))


def assigned(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderAssignedEvent) -> None:
    """A shop assigns its order by hand: a manual offer to that rider (who must have room)."""
    d = event.data
    order = p.shop_order(where, d.order)
    rider = p.riders.get(d.rider)
    if rider is None:
        raise RefusedError(f"unknown rider {d.rider!r}")
    if rider.presence != "online":
        raise RefusedError(f"rider {d.rider!r} is offline")
    if order.status not in UNASSIGNED | {S.ASSIGNED, S.ACCEPTED}:
        raise RefusedError(f"order {d.order!r} is {order.status}; it can no longer be reassigned")
    load = len(p.rider_orders.get(d.rider, ())) - (1 if order.rider == d.rider else 0)
    if load >= rider.capacity:
        raise RefusedError(f"rider {d.rider!r} is full ({load}/{rider.capacity})")
    deadline = work.now + timedelta(seconds=p.manual_offer_timeout_s)
    offer = ev.DispatchOfferedEvent(
        id=event.id,
        source=event.source,
        time=event.time,
        data=ev.DispatchOffer(
            offer=derived_id("offer", event.id),
            order=d.order,
            rider=d.rider,
            deadline=deadline,
            mode="manual",
        ),
    )
    offers.offer(p, work, where, offer)


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.OrderCreatedEvent: created,
    ev.OrderCancelledEvent: cancelled,
    ev.OrderStatusChangedEvent: rider_status,
    ev.OrderIncidentReportedEvent: incident,
    ev.OrderAssignedEvent: assigned,
}
