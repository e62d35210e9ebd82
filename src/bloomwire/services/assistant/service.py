"""The assistant service: answers customers' questions in the order chat from the store's facts.

It reads the canonical ``shops/S/orders/O/chat`` (a line is there only once the persister stored
it) in a persistent session, so lines said while it restarts are answered (unless stale). A
customer's line is classified (:mod:`.intents`), the order is read from the store (read-only,
like dispatch and alerts), and the answer (:mod:`.answers`) goes out as an
``order.chat_posted`` on ``services/assistant/events``: the persister stores it and publishes it marked
``assistant:S``. What it cannot answer, a complaint, or a change only the shop can grant, it hands
over: an ``alert.raised`` of rule ``needs_person`` (one open per order), and the customer is told a
person will reply. When a person of the shop writes in that chat, the alert is resolved.

Ids derive from the customer's line (uuid5) and times from its time (plus :data:`AFTER`, so the
answer sorts after it): a line redelivered after a restart gives the very same events, which the
persister acknowledges as duplicates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, tzinfo
from typing import Final

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import TopicError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.assistant.answers import OrderFacts, Reply, answer
from bloomwire.services.assistant.intents import classify
from bloomwire.store import make_engine
from bloomwire.store.models import ALERTS, ORDERS

NAME: Final = topics.ASSISTANT
log = get_logger("bloomwire.assistant")

EVENTS_TOPIC: Final = topics.service_events(NAME)
SOURCE: Final = topics.parse_inbound(EVENTS_TOPIC).source
#: A customer's line older than this (the service was down) gets no answer: it is stale.
MAX_AGE: Final = timedelta(minutes=10)
#: What the assistant says is dated this much after the line it answers.
AFTER: Final = timedelta(milliseconds=1)
#: Seconds a hand-over sent is remembered: by then the store shows it (it is the truth after).
GRACE_S: Final = 30.0
ACTION: Final = "Reply to the customer in the order's chat."
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://bloomwire.invalid/assistant")
_UNRESOLVED: Final = ("open", "acknowledged")
_RULES: Final = [r.value for r in ev.ASSISTANT_RULES]
_O = ORDERS.c


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def answer_id(line: str) -> str:
    """The id of the answer to the customer's line ``line`` (its event id)."""
    return _uuid("answer", line)


def handover_id(line: str) -> str:
    """The id of the alert raised for the customer's line ``line``."""
    return _uuid("handover", line)


class Store:
    """Read-only look-ups of one order's facts and its open hand-overs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def facts(self, order: str) -> tuple[OrderFacts | None, list[str]]:
        """The order's facts (None if unknown) and its unresolved hand-over alert ids."""
        cols = (
            _O.id, _O.shop, _O.status, _O.rider, _O.eta, _O.window_start, _O.window_end,
            _O.customer_phone, _O.delivered_at, _O.failure_reason,
        )  # fmt: skip
        alerts = sa.select(ALERTS.c.id).where(
            ALERTS.c.order_id == order, ALERTS.c.rule.in_(_RULES), ALERTS.c.status.in_(_UNRESOLVED)
        )
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(_O.id == order)).first()
            open_ids = list(conn.execute(alerts).scalars())
        if row is None:
            return None, open_ids
        facts = OrderFacts(
            order=row[0], shop=row[1], status=OrderStatus(row[2]), rider=row[3], eta=row[4],
            window_start=row[5], window_end=row[6], phone=row[7] or "", delivered_at=row[8],
            failure_reason=row[9],
        )  # fmt: skip
        return facts, open_ids


class Assistant:
    """Decides what to say; publishes through ``publish(topic, payload)``."""

    def __init__(
        self,
        store: Store,
        publish: Callable[[str, bytes], None],
        *,
        clock: Callable[[], datetime],
        tz: tzinfo,
    ) -> None:
        self.store, self.publish, self.clock, self.tz = store, publish, clock, tz
        #: Hand-overs sent that the store may not show yet: order -> (alert id, time.monotonic()).
        self.handed: dict[str, tuple[str, float]] = {}
        self.answered = 0
        self.handovers = 0

    async def on_chat(self, order: str, event: ev.Event) -> None:
        """A stored chat line of ``order``: answer the customer's, note a person's reply."""
        if not isinstance(event, ev.OrderChatPostedEvent):
            return
        role = event.data.author.split(":", 1)[0]
        if role == "customer":
            await self._answer(order, event)
        elif role == "shop" and event.source.startswith(f"{topics.SHOPS}/"):
            await self._person_replied(order, event)

    async def _answer(self, order: str, event: ev.OrderChatPostedEvent) -> None:
        now = self.clock()
        if now - event.time > MAX_AGE:
            log.info("stale customer line not answered", order=order, line=event.id)
            return
        facts, open_ids = await asyncio.to_thread(self.store.facts, order)
        if facts is None:
            log.warning("customer line on an unknown order", order=order, line=event.id)
            return
        reading = classify(event.data.text)
        own = handover_id(event.id)  # raised for this very line: it is redelivered, say the same again
        handed = any(a != own for a in open_ids) or self._recent(order) not in (None, own)
        reply = answer(reading, event.data.text, facts, now, self.tz, handed_over=handed)
        self._send(facts, event.id, reply, event.time + AFTER)
        log.debug("answered", order=order, intent=reading.intent.value, lang=reading.lang.value)

    def _recent(self, order: str) -> str | None:
        """The hand-over sent for ``order`` in the last :data:`GRACE_S` seconds (forgets older ones)."""
        mono = time.monotonic()
        self.handed = {o: h for o, h in self.handed.items() if mono - h[1] <= GRACE_S}
        sent = self.handed.get(order)
        return sent[0] if sent else None

    def _send(self, facts: OrderFacts, line: str, reply: Reply, at: datetime) -> None:
        chat = ev.OrderChatPostedEvent(
            id=answer_id(line), source=SOURCE, time=at, data=ev.OrderChat(order=facts.order, text=reply.text)
        )
        self.publish(EVENTS_TOPIC, ev.encode(chat))
        self.answered += 1
        if reply.alert is None:
            return
        alert = handover_id(line)
        raised = ev.AlertRaisedEvent(
            id=_uuid("alert.raised", alert),
            source=SOURCE,
            time=at,
            data=ev.AlertRaised(
                alert=alert,
                rule=ev.AlertRule.NEEDS_PERSON,
                severity=ev.Severity.WARNING,
                shop=facts.shop,
                order=facts.order,
                message=reply.alert,
                action=ACTION,
            ),
        )
        self.publish(EVENTS_TOPIC, ev.encode(raised))
        self.handed[facts.order] = (alert, time.monotonic())
        self.handovers += 1

    async def _person_replied(self, order: str, event: ev.OrderChatPostedEvent) -> None:
        _facts, open_ids = await asyncio.to_thread(self.store.facts, order)
        sent = self._recent(order)
        self.handed.pop(order, None)
        for alert in sorted({*open_ids, *([sent] if sent else [])}):
            resolved = ev.AlertResolvedEvent(
                id=_uuid("alert.resolved", alert),
                source=SOURCE,
                time=event.time + AFTER,
                data=ev.AlertResolved(alert=alert, reason="a person of the shop replied in the chat"),
            )
            self.publish(EVENTS_TOPIC, ev.encode(resolved))


def _readonly_engine(url: str) -> Engine:
    engine = make_engine(url, readonly=True)
    if engine.dialect.name == "postgresql":  # the server refuses any write
        return engine.execution_options(postgresql_readonly=True)
    return engine


class AssistantService(Service[Assistant]):
    """The assistant :class:`~bloomwire.runtime.mqtt.Service`: its state is the :class:`Assistant`."""

    def figures(self) -> Iterator[Figure]:
        """Lines answered and handed over, for Prometheus (at scrape time)."""
        if self.has_state:
            core = self.state
            yield Figure("bloomwire_assistant_answered", "Customer lines answered", core.answered)
            yield Figure("bloomwire_assistant_handovers", "Conversations handed to the shop", core.handovers)


def build(
    settings: Settings,
    *,
    metrics: ServiceMetrics | None = None,
    clock: Callable[[], datetime] = ev.now,
    tz: tzinfo | None = None,
) -> AssistantService:
    """Declare the assistant: one handler over every order's canonical chat.

    ``tz`` (default: ``settings.assistant_timezone``) is where the clock times it says are read;
    an unknown zone raises :class:`~bloomwire.errors.ConfigError` before anything connects.
    """
    zone = tz if tz is not None else settings.customer_zone()
    # Persistent: a line asked while the assistant restarts waits in its session (MAX_AGE aside).
    service = AssistantService(NAME, persistent=True, metrics=metrics)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.figures))

    @service.on_startup
    async def start() -> Assistant:
        engine = await asyncio.to_thread(_readonly_engine, settings.database_url)
        publish = lambda topic, payload: service.publish(topic, payload, qos=1)  # noqa: E731
        return Assistant(Store(engine), publish, clock=clock, tz=zone)

    @service.handle(topics.all_orders_filter(topics.OrderChannel.CHAT), retry=True, model=ev.decode)
    async def on_chat(event: ev.Event, msg: Message) -> None:
        try:
            order = topics.parse_order_topic(msg.topic).order
        except TopicError as exc:
            log.warning("chat line on a topic of no order", topic=msg.topic, error=str(exc))
            return
        await service.state.on_chat(order, event)

    @service.on_shutdown
    async def stop() -> None:
        if service.has_state:
            service.state.store.engine.dispose()

    return service
