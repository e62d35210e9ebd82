"""Chat on an order: from its customer, its rider, its shop, or a service writing as the shop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import RIDER_BOUND
from bloomwire.contract.topics import Identity, InboundTopic
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.work import RefusedError, UnitOfWork


def _author(p: Projections, where: InboundTopic, claimed: str | None) -> tuple[Order, str, str]:
    """The order a line is on and who wrote it (role, name), if the sender may write there."""
    if where.identity is Identity.CUSTOMER:
        order_id = p.customer_order(where.sender)
        if order_id is None:
            raise RefusedError(f"customer {where.sender!r} has no order")
        if claimed not in (None, order_id):
            raise RefusedError(f"customer {where.sender!r} may only chat on its own order")
        order = p.order(order_id)
        return order, "customer", order.customer_name
    if claimed is None:
        raise RefusedError("data.order: required")
    if where.identity is Identity.RIDER:
        return p.rider_order(where, claimed), "rider", where.sender
    if where.identity is Identity.SHOP:
        return p.shop_order(where, claimed), "shop", where.sender
    order = p.order(claimed)  # a service writing as the shop (follow-ups), or its assistant
    if where.sender == topics.ASSISTANT:
        return order, "assistant", order.shop
    return order, "shop", f"{order.shop} ({where.sender})"


def line(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderChatPostedEvent) -> None:
    """A chat line: stored, published on the order, and sent to its rider when not from it."""
    d = event.data
    order, author_role, author = _author(p, where, d.order)
    work.chat.append(
        {
            "id": event.id,
            "order_id": order.id,
            "shop": order.shop,
            "author_role": author_role,
            "author": author,
            "text": d.text,
            "at": event.time,
        }
    )
    # Plain construction: pydantic-core validates faster than model_construct skips it.
    canonical = ev.OrderChatPostedEvent(
        id=event.id,
        source=event.source,
        time=event.time,
        data=ev.OrderChat(order=order.id, text=d.text, author=f"{author_role}:{author}"),
    )
    payload = ev.encode(canonical)
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.CHAT), payload)
    if author_role != "rider" and order.rider and order.status in RIDER_BOUND:
        work.publish(topics.rider_inbox(order.rider, topics.Inbox.CHAT), payload)


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.OrderChatPostedEvent: line,
}
