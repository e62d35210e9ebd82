"""Proof of delivery (issue 16): the handover code and the delivery photo.

Each order gets a random code when it is created (:func:`mint_code`); the customer sees it in
the order's retained state and reads it out to the rider. When the order requires it, the
rider's ``delivered`` must carry it (:func:`check_handover`, a hook of ``orders.rider_status``):
a wrong or missing code is refused, told to the rider and the shop, and counted on the order;
the alerts service's ``handover_code`` rule raises the alert once the count reaches its limit.

A photo arrives as bytes on ``riders/R/orders/O/photo``; :func:`photo_event` (decode step, pure)
checks it and makes it an ``order.photo_attached``; :func:`photo_attached` records it on the
order. The projector writes the bytes to the photo store (``store/photos.py``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.contract.photo import check_photo
from bloomwire.contract.topics import InboundTopic
from bloomwire.services.persister.projections import RIDER_HOLDS, Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.work import RefusedError, UnitOfWork

#: Digits of a handover code: 10,000 codes, and the alert comes after a few wrong ones.
CODE_DIGITS = 4


def mint_code() -> str:
    """A fresh handover code: random (``secrets``), so nothing about the order predicts it."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def check_handover(work: UnitOfWork, p: Projections, order: Order, code: str | None) -> None:
    """Refuse a ``delivered`` without the order's code when the order requires one.

    A wrong code is counted on the order (kept although the status is refused) and the shop is
    told on ``shops/S/errors``; the rider hears of it on its error inbox like any refusal.
    """
    if not order.handover_code_required or order.handover_code is None:
        return
    if code is not None and secrets.compare_digest(code, order.handover_code):
        return
    failures = order.handover_failures + 1
    work.change(p.orders, order, handover_failures=failures, updated_at=work.now)
    what = "no handover code given" if code is None else "wrong handover code"
    reason = (
        f"handover_code: order {order.id!r} requires the customer's handover code to be "
        f"delivered; {what} (wrong attempts: {failures})"
    )
    refusal = ev.Refusal(topic=topics.rider_order_status(order.rider or "unknown", order.id), reason=reason)
    work.publish(topics.shop_errors(order.shop), ev.encode(refusal))
    raise RefusedError(reason)


def photo_event(payload: bytes, where: InboundTopic, now: datetime) -> ev.OrderPhotoAttachedEvent:
    """The ``order.photo_attached`` a photo payload stands for (raises ``PayloadError`` if bad)."""
    ref = check_photo(payload)
    assert where.order is not None  # a photo topic names its order
    return ev.OrderPhotoAttachedEvent(
        id=ev.photo_event_id(where.sender, where.order, ref.sha256),
        source=where.source,
        time=now,
        data=ev.OrderPhoto(order=where.order, photo=ref),
    )


def photo_refusal_id(payload: bytes, where: InboundTopic) -> str | None:
    """The id a refused photo is known by (the device derives the same one), if it has an order."""
    if where.order is None:
        return None
    return ev.photo_event_id(where.sender, where.order, hashlib.sha256(payload).hexdigest())


def photo_attached(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderPhotoAttachedEvent
) -> None:
    """The order's rider sends its photo while it holds the order, or once it delivered it."""
    d = event.data
    order = p.order(d.order)
    if order.rider != where.sender:
        raise RefusedError(f"order {d.order!r} is not assigned to rider {where.sender!r}")
    if order.status not in RIDER_HOLDS and order.status != OrderStatus.DELIVERED:
        raise RefusedError(f"order {d.order!r} is {order.status}; a photo proves a delivery")
    work.change(p.orders, order, photo=d.photo.model_dump(mode="json"), updated_at=work.now)
    work.states[order.id] = None
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), ev.encode(event))


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.OrderPhotoAttachedEvent: photo_attached,
}
