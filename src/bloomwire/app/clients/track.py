"""The customer's tracker: one order, nothing else.

Connects with the order's customer login (``c-<order>``, or the login the access-control
provisioner issued) and subscribes exactly the four channels a customer may read,
``shops/S/orders/O/{status,location,chat,state}``, plus its own inbox for acks and refusals.
Chat lines go out on ``customers/C/chat``; the persister files them under the order it knows
this customer by. Each line stays in the tracker's outbox until its ack on
``customers/C/inbox/acks`` (or refusal) and is re-sent with the same id after a reconnection.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bloomwire.app.clients.access import customer_username
from bloomwire.app.clients.base import (
    DEFAULT_ANSWER_TIMEOUT_S,
    Client,
    NullObserver,
    Observer,
    Outcome,
    Waiters,
    build_data,
    check_name,
)
from bloomwire.app.clients.outbox import Outbox
from bloomwire.app.clients.sender import RESEND_AFTER_S, OutboxSender, memory_outbox, wait_confirmed
from bloomwire.app.clients.views import TrackView
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.mqtt import Message
from bloomwire.runtime.settings import Settings


def customer_filters(shop: str, order: str, customer: str) -> list[str]:
    """Every topic filter the tracker of ``order`` (customer id ``customer``) subscribes to."""
    own = [topics.order_topic(shop, order, channel) for channel in topics.CUSTOMER_CHANNELS]
    return [*own, topics.customer_inbox_filter(customer)]


class CustomerTracker(Client):
    """Customer of order ``O`` (shop ``S``)."""

    what = "customer"

    def __init__(
        self,
        settings: Settings,
        shop: str,
        order: str,
        password: str,
        *,
        username: str | None = None,
        customer: str | None = None,
        destination: tuple[float, float] | None = None,
        observer: Observer | None = None,
        outbox: Outbox | None = None,
        resend_after_s: float = RESEND_AFTER_S,
    ) -> None:
        self.shop = check_name(shop, "shop")
        self.order = check_name(order, "order")
        #: The customer id C (``customers/C/...``); the login may differ (access-control mode).
        self.customer = check_name(customer, "customer") if customer else customer_username(self.order)
        name = check_name(username, "username") if username else self.customer
        super().__init__(settings, name, password)
        self.view = TrackView(self.shop, self.order, destination)
        self.observer: Observer = observer or NullObserver()
        self.waiters = Waiters()
        #: Chat lines not yet acknowledged (None: one in memory, kept as long as the process).
        self.outbox = outbox if outbox is not None else memory_outbox()
        self.sender = OutboxSender(self.conn, self.outbox, resend_after_s=resend_after_s)
        self.subscribe(customer_filters(self.shop, self.order, self.customer))

    async def start(self, timeout: float = 20.0, on_retry: Callable[[str], None] | None = None) -> None:
        """Connect, then publish whatever the outbox still holds, and keep sending."""
        await super().start(timeout, on_retry)
        self.sender.start()

    def handle(self, msg: Message) -> None:
        """Fold the order's messages into the view; settle chat lines by ack or refusal."""
        if msg.topic == topics.customer_inbox(self.customer, topics.Inbox.ACKS):
            ids = [str(i) for i in ev.Ack.model_validate_json(msg.payload).ids]
            for e in self.outbox.ack(ids):
                self.observer.settled(e.id, True)
            for i in ids:
                self.waiters.resolve(i, True)
            return
        if msg.topic == topics.customer_inbox(self.customer, topics.Inbox.ERRORS):
            refusal = ev.Refusal.model_validate_json(msg.payload)
            entry = self.outbox.refuse(refusal.id, refusal.reason) if refusal.id else None
            if entry is not None:
                self.observer.settled(entry.id, False, refusal.reason)
            self.waiters.resolve(refusal.id, False, refusal.reason)
        event = self.view.apply(msg.topic, msg.payload)
        if event is not None and not msg.retain:
            self.observer.canonical(event.id, msg.received_at)

    async def chat(self, text: str, *, timeout: float = DEFAULT_ANSWER_TIMEOUT_S) -> Outcome:
        """Send a chat line about the order and wait until it is stored (or refused); without an
        answer in time, :class:`~bloomwire.app.clients.sender.QueuedError` (kept and re-sent)."""
        data = build_data(ev.OrderChat, order=self.order, text=text)
        event = ev.OrderChatPostedEvent(source=f"{topics.CUSTOMERS}/{self.customer}", data=data)
        fut = self.waiters.expect(event.id)
        self.sender.send(event.id, "chat", topics.customer_chat(self.customer), ev.encode(event))
        self.observer.sent(event.id, "customer:chat", time.time())
        return await wait_confirmed(fut, timeout, event.id, "the chat line")

    async def rate(
        self, stars: int, comment: str = "", *, timeout: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> Outcome:
        """Rate the delivered order (once) and wait until it is stored (or refused)."""
        data = build_data(ev.OrderRating, order=self.order, stars=stars, comment=comment)
        event = ev.OrderRateEvent(source=f"{topics.CUSTOMERS}/{self.customer}", data=data)
        fut = self.waiters.expect(event.id)
        self.sender.send(event.id, "chat", topics.customer_chat(self.customer), ev.encode(event))
        self.observer.sent(event.id, "customer:rate", time.time())
        return await wait_confirmed(fut, timeout, event.id, "the rating")

    async def stop(self, *, announce_offline: bool = True) -> None:
        """Disconnect (unacknowledged lines stay in the outbox for the next start)."""
        await self.sender.stop()
        self.waiters.cancel_all()
        await super().stop(announce_offline=announce_offline)
