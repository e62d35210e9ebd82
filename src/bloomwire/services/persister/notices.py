"""Notices: what the notices service tells an order's customer unasked (issue 16).

Stored once like every event (its uuid5 id makes a re-sent notice a duplicate) and published on
the order's status topic, which its customer and its shop already read. The latest is kept on the
order (``orders.notice``) for its retained state: a page opened later still shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.topics import Identity, InboundTopic
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.work import RefusedError, UnitOfWork


def notified(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderNotifiedEvent) -> None:
    """A notice of the notices service about a known order: published on the order's status."""
    if where.identity is not Identity.SERVICE or where.sender != topics.NOTICES:
        raise RefusedError(f"only the {topics.NOTICES} service sends notices")
    order = p.order(event.data.order)
    last = order.notice
    if last is None or datetime.fromisoformat(str(last["at"])) <= event.time:  # a late one stays behind
        notice = ev.StateNotice(**event.data.model_dump(), at=event.time)
        work.change(
            p.orders, order, notice=notice.model_dump(mode="json", exclude_none=True), updated_at=work.now
        )
        work.states[order.id] = None
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), ev.encode(event))


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.OrderNotifiedEvent: notified,
}
