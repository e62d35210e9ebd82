"""Ratings: a customer rates its delivered order once, 1 to 5 stars with a comment.

A rating is final: a second one is refused, so an average never moves under the shop's feet and
the stored ``order.rated`` events are the ratings as they are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.contract.topics import Identity, InboundTopic
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.work import RefusedError, UnitOfWork


def rated(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderRatedEvent) -> None:
    """A customer's rating of its own delivered order: stored on the order and published."""
    d = event.data
    if where.identity is not Identity.CUSTOMER:  # pragma: no cover - guarded by ``accepted_types``
        raise RefusedError("only an order's customer may rate it")
    order_id = p.customer_order(where.sender)
    if order_id is None:
        raise RefusedError(f"customer {where.sender!r} has no order")
    if d.order not in (None, order_id):
        raise RefusedError(f"customer {where.sender!r} may only rate its own order")
    order = p.order(order_id)
    if order.status != OrderStatus.DELIVERED:
        raise RefusedError(f"order {order_id!r} is {order.status}; it can be rated once delivered")
    if order.rating is not None:
        raise RefusedError(f"order {order_id!r} is already rated ({order.rating} stars)")
    work.change(p.orders, order, rating=d.stars, rating_comment=d.comment, updated_at=work.now)
    work.states[order.id] = None
    canonical = ev.OrderRatedEvent(
        id=event.id,
        source=event.source,
        time=event.time,
        data=ev.OrderRating(order=order.id, stars=d.stars, comment=d.comment),
    )
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), ev.encode(canonical))


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.OrderRatedEvent: rated,
}
