"""The customer's tracker: one order, nothing else.

Connects with the order's customer login (``c-<order>``, or the login the access-control
provisioner issued) and subscribes exactly the four channels a customer may read,
``shops/S/orders/O/{status,location,chat,state}``, plus its own inbox for acks and refusals.
Chat lines go out on ``customers/C/chat``; the persister files them under the order it knows
this customer by.
"""

from __future__ import annotations

import time

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
    wait_outcome,
)
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
        self.subscribe(customer_filters(self.shop, self.order, self.customer))

    def handle(self, msg: Message) -> None:
        """Fold the order's messages into the view; settle chat lines by ack or refusal."""
        if msg.topic == topics.customer_inbox(self.customer, topics.Inbox.ACKS):
            for i in ev.Ack.model_validate_json(msg.payload).ids:
                if self.waiters.resolve(i, True):
                    self.observer.settled(i, True)
            return
        if msg.topic == topics.customer_inbox(self.customer, topics.Inbox.ERRORS):
            refusal = ev.Refusal.model_validate_json(msg.payload)
            if self.waiters.resolve(refusal.id, False, refusal.reason) and refusal.id:
                self.observer.settled(refusal.id, False, refusal.reason)
        event = self.view.apply(msg.topic, msg.payload)
        if event is not None and not msg.retain:
            self.observer.canonical(event.id, msg.received_at)

    async def chat(self, text: str, *, timeout: float = DEFAULT_ANSWER_TIMEOUT_S) -> Outcome:
        """Send a chat line about the order and wait until it is stored (or refused)."""
        data = build_data(ev.OrderChat, order=self.order, text=text)
        event = ev.OrderChatEvent(source=f"{topics.CUSTOMERS}/{self.customer}", data=data)
        fut = self.waiters.expect(event.id)
        self.conn.publish(topics.customer_chat(self.customer), ev.encode(event), qos=1)
        self.observer.sent(event.id, "customer:chat", time.time())
        return await wait_outcome(fut, timeout, "the chat line")

    async def stop(self, *, announce_offline: bool = True) -> None:
        """Disconnect."""
        self.waiters.cancel_all()
        await super().stop(announce_offline=announce_offline)
