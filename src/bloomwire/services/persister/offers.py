"""Dispatch offers: an offer made, a rider's reply, an offer expired."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import UNASSIGNED, OrderStatus
from bloomwire.contract.topics import InboundTopic
from bloomwire.services.persister.lifecycle import close_offer, publish_status, set_status
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Offer
from bloomwire.services.persister.work import RefusedError, UnitOfWork

S = OrderStatus


def offer(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.DispatchOfferedEvent) -> None:
    """An order offered to a rider (by dispatch, or a shop's manual assignment)."""
    d = event.data
    now = work.now
    order = p.order(d.order)
    if p.offers.get(d.offer) is not None:
        raise RefusedError(f"offer {d.offer!r} already exists")
    if order.status not in UNASSIGNED and d.mode != "manual":
        raise RefusedError(f"order {d.order!r} is {order.status}; only unassigned orders get offers")
    if d.rider in order.declined_by and d.mode != "manual":
        raise RefusedError(f"rider {d.rider!r} already declined order {d.order!r}")
    if d.deadline <= now:
        raise RefusedError(f"offer deadline {d.deadline.isoformat()} has already passed")
    close_offer(p, work, order, "superseded")
    candidates = [c.model_dump(mode="json") for c in d.candidates]
    made = Offer(
        id=d.offer,
        order_id=d.order,
        rider=d.rider,
        mode=d.mode,
        cost=d.cost,
        candidates=candidates,
        deadline=d.deadline,
        created_at=now,
    )
    work.add(p.offers, made)
    set_status(p, work, order, S.ASSIGNED, event.time, rider=d.rider)
    work.change(p.orders, order, offer_id=d.offer, offer_deadline=d.deadline)
    publish_status(work, order, event, f"offered to {d.rider}")
    to_rider = event.model_copy(update={"data": d.model_copy(update={"candidates": []})})
    expiry = max(1, int((d.deadline - now).total_seconds()))
    work.publish(topics.rider_inbox(d.rider, topics.Inbox.OFFERS), ev.encode(to_rider), expiry_s=expiry)


def reply(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.DispatchRepliedEvent) -> None:
    """The rider's answer to its offer: accepted, or declined (the order goes back to dispatch)."""
    d = event.data
    found = p.offers.get(d.offer)
    if found is None:
        raise RefusedError(f"unknown offer {d.offer!r}")
    if found.rider != where.sender:
        raise RefusedError(f"offer {d.offer!r} was made to another rider")
    if found.order_id != d.order:
        raise RefusedError(f"offer {d.offer!r} is for order {found.order_id!r}, not {d.order!r}")
    if found.status != "pending":
        raise RefusedError(f"offer {d.offer!r} is already {found.status}")
    if work.now > found.deadline:
        raise RefusedError(f"offer {d.offer!r} expired at {found.deadline.isoformat()}; too late to answer")
    order = p.order(d.order)
    if order.offer_id != d.offer or order.rider != where.sender:
        raise RefusedError(f"order {d.order!r} is no longer offered to {where.sender!r}")
    work.change(p.offers, found, status="accepted" if d.accept else "declined", closed_at=work.now)
    if d.accept:
        set_status(p, work, order, S.ACCEPTED, event.time)
    else:
        set_status(p, work, order, S.DECLINED, event.time, rider=None)
        work.change(p.orders, order, declined_by=[*order.declined_by, where.sender])
        rider = p.rider(work, where.sender)
        work.change(p.riders, rider, last_decline_at=work.now)
    publish_status(work, order, event, d.reason)


def expired(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.DispatchExpiredEvent) -> None:
    """Dispatch says an offer ran out: the order goes back to dispatch."""
    d = event.data
    made = p.offers.get(d.offer)
    if made is None:
        raise RefusedError(f"unknown offer {d.offer!r}")
    if made.status != "pending":
        raise RefusedError(f"offer {d.offer!r} is already {made.status}")
    if work.now < made.deadline:
        raise RefusedError(f"offer {d.offer!r} runs until {made.deadline.isoformat()}")
    work.change(p.offers, made, status="expired", closed_at=work.now)
    order = p.order(d.order)
    if order.offer_id == d.offer and order.status == S.ASSIGNED:
        set_status(p, work, order, S.DECLINED, event.time, rider=None)
        work.change(p.orders, order, declined_by=[*order.declined_by, made.rider])
        publish_status(work, order, event, f"offer to {made.rider} timed out")


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.DispatchOfferedEvent: offer,
    ev.DispatchRepliedEvent: reply,
    ev.DispatchExpiredEvent: expired,
}
